"""Uploading to the Hugging Face Hub: ``push_to_hub`` and ``save_pretrained(..., push_to_hub=True)``.

As diffusers: the files ``save_pretrained`` writes, uploaded with huggingface_hub (``create_repo``, then
``upload_folder``). ``upload_folder`` makes one commit, so the repository gets every file or none: a failed
push leaves nothing half-uploaded. ldmkit also saves before it touches the Hub (a save that fails creates no
repository) and refuses at once when huggingface_hub is offline (HF_HUB_OFFLINE), before saving anything.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import LDMKitError
from ..io import atomic_write_text
from .hub import offline_mode

PUSH_OPTIONS = ("repo_id", "commit_message", "private", "token", "create_pr")


def check_online(repo_id: str) -> None:
    """Refuse to push while huggingface_hub is offline, with its own error as the cause."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if offline_mode() or constants.HF_HUB_OFFLINE:
        cause = OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled. To disable it, please unset "
                                     "the `HF_HUB_OFFLINE` environment variable.")
        raise LDMKitError(f"Cannot push to {repo_id!r}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1), so "
                          "nothing was saved or uploaded. Unset HF_HUB_OFFLINE to upload, or keep the files "
                          "locally with save_pretrained(folder).") from cause


def _commit_message(what: str) -> str:
    # diffusers' defaults, from the class name.
    if "Model" in what:
        return "Upload model"
    return "Upload scheduler" if "Scheduler" in what else f"Upload {what}"


def _write_card(api, repo_id: str, folder: Path, what: str) -> None:
    """A short README.md for a repository that has none (an existing card is left as it is)."""
    if (folder / "README.md").exists() or api.file_exists(repo_id, "README.md"):
        return
    loader = "DiffusionPipeline" if "Pipeline" in what else what
    atomic_write_text(folder / "README.md", (
        f"---\nlibrary_name: diffusers\ntags:\n- ldmkit\n- latent-diffusion\n---\n\n# {repo_id}\n\n"
        f"A {what} saved by ldmkit in the diffusers layout. Load it with ldmkit or diffusers:\n\n"
        f"```python\n{loader}.from_pretrained({repo_id!r})\n```\n"))


def _push_error(repo_id: str, e: Exception) -> LDMKitError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return LDMKitError(f"Cannot push to {repo_id!r}: {e}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return LDMKitError(f"The Hub refused the push to {repo_id!r} ({status}): log in with `hf auth login` or "
                           "pass token= with write access to that namespace.")
    return LDMKitError(f"Could not push to {repo_id!r} ({e.__class__.__name__}: {e}). upload_folder commits every "
                       "file at once or none, so the repository holds no part of this upload; retry when the Hub "
                       "is reachable.")


def upload_saved_folder(folder: Path, repo_id: str, *, what: str, commit_message: str | None = None,
                        private: bool | None = None, token: str | None = None, create_pr: bool = False,
                        subfolder: str | None = None):
    """Upload a saved ``folder`` to ``repo_id`` (into ``subfolder`` of it) in one commit; returns
    huggingface_hub's CommitInfo (a str: the commit's URL)."""
    from huggingface_hub import HfApi

    check_online(repo_id)
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if not subfolder:
            _write_card(api, repo_id, folder, what)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=subfolder or None,
                                 commit_message=commit_message or _commit_message(what), create_pr=create_pr)
    except Exception as e:  # huggingface_hub raises many types (HTTP, connection, auth); all mean "not pushed"
        raise _push_error(repo_id, e) from e


def push_saved(save: Callable[[Path], None], repo_id: str, *, what: str, **options):
    """``push_to_hub``: ``save(tmp)`` into a temporary folder, then :func:`upload_saved_folder` (``options``)."""
    check_online(repo_id)
    with tempfile.TemporaryDirectory(prefix="ldmkit-push-") as tmp:
        save(Path(tmp))
        return upload_saved_folder(Path(tmp), repo_id, what=what, **options)


def upload_after_save(folder: str | os.PathLike, push_to_hub: bool, options: dict,
                      what: str) -> Callable[[Path], object] | None:
    """For ``save_pretrained(folder, push_to_hub=..., **options)``: check the push options (diffusers':
    ``repo_id``, default the folder's name, ``commit_message``, ``private``, ``token``, ``create_pr``) and the
    offline mode before anything is written; returns the upload to run once the folder is saved (None when
    not pushing)."""
    unknown = sorted(set(options) - set(PUSH_OPTIONS))
    if unknown:
        raise LDMKitError(f"save_pretrained got unexpected keyword(s) {unknown}; it takes safe_serialization, variant, "
                          f"max_shard_size, push_to_hub and, with push_to_hub=True, {', '.join(PUSH_OPTIONS)}.")
    if not push_to_hub:
        if options:
            raise LDMKitError(f"save_pretrained got {sorted(options)}, which only mean something with "
                              "push_to_hub=True.")
        return None
    options = dict(options)
    repo_id = options.pop("repo_id", None) or Path(folder).name
    check_online(repo_id)
    return lambda saved: upload_saved_folder(saved, repo_id, what=what, **options)
