"""Training faults (issue 15): checksummed checkpoints, a full disk, a changed recipe on resume, and SIGINT /
SIGTERM in ``ldmkit train``. The SIGKILL storm is tests/test_training_kills.py."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldmkit.errors import LDMKitError
from ldmkit.io import Terminated
from ldmkit.tokenizer import LDMTokenizer
from ldmkit.training import build_recipe, latent_cache, train_ldm
from ldmkit.training import checkpoints as ckpt
from ldmkit.training.faults import commit_folder, disk_errors
from ldmkit.training.manifest import MANIFEST, verify
from ldmkit.training.recipe_check import changed_keys
from training_utils import final_weights, ldm_dict, tiny_autoencoder, toy_data, write_yaml

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- checkpoints without training


def _save(out: Path, step: int, keep_last: int = 5, value: float = 0.0) -> Path:
    payload = {"models": {"w": torch.full((2000,), value + step)}, "optimizers": {"m": torch.arange(300.0)}}
    return ckpt.save_checkpoint(out, step, payload, {"step": step}, rank=0, is_main=True, barrier=lambda: None,
                                keep_last=keep_last, extra_text={"recipe.yaml": f"step: {step}\n"})


def _hidden(root: Path) -> list[Path]:
    """Temporary files and folders (``.NAME.XXXX.tmp``, ``.step-N.partial``, ``.NAME.old``) under ``root``."""
    return [p for p in Path(root).rglob(".*")]


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_manifest_of_all_its_files(tmp_path):
    folder = _save(tmp_path, 2)
    listed = sorted(line.split("  ")[1] for line in (folder / MANIFEST).read_text().splitlines())
    assert listed == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert {"models.pt", "optimizers.pt", "rng-rank0.pt", "recipe.yaml", ckpt.STATE_FILE} <= set(listed)
    assert verify(folder) is None and not _hidden(tmp_path)
    # The coreutils format: `sha256sum -c SHA256SUMS` checks a checkpoint by hand.
    if Path("/usr/bin/sha256sum").exists():
        subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST], cwd=folder, check=True)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(tmp_path, caplog, how):
    for step in (2, 4, 6):
        _save(tmp_path, step)
    newest = ckpt.checkpoint_dir(tmp_path, 6)
    _damage(newest / "models.pt", how)
    with caplog.at_level(logging.WARNING, logger="ldmkit.training"):
        path, damaged = ckpt.resolve_resume(tmp_path, "latest")
    assert path == ckpt.checkpoint_dir(tmp_path, 4) and damaged == [newest]
    assert f"{newest} is damaged (models.pt does not match its checksum)" in caplog.text
    # Set aside (kept for a look, out of keep_last's count), and an explicit --resume of it is refused.
    ckpt.set_aside_damaged(damaged)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    assert (tmp_path / "checkpoints" / "step-00000006.damaged" / "models.pt").is_file()
    with pytest.raises(LDMKitError, match="damaged .*models.pt does not match.*--resume latest"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-00000006.damaged"))


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    for step in (2, 4):
        _save(tmp_path, step)
    _damage(ckpt.checkpoint_dir(tmp_path, 4) / "optimizers.pt", "flipped")
    (ckpt.checkpoint_dir(tmp_path, 2) / ckpt.STATE_FILE).write_text('{"step": 3}\n')  # edited by hand
    with pytest.raises(LDMKitError, match="every checkpoint in .* is damaged.*without --resume"):
        ckpt.resolve_resume(tmp_path, "latest")
    (ckpt.checkpoint_dir(tmp_path, 2) / MANIFEST).write_text("not a manifest\n")
    assert "SHA256SUMS is unreadable" in verify(ckpt.checkpoint_dir(tmp_path, 2))


class FullDisk:
    """torch.save onto a disk with ``free`` bytes left: the write that does not fit writes what fits and raises
    ENOSPC, as a real full disk does (torch's zip writer then raises its own RuntimeError around it)."""

    def __init__(self, monkeypatch, free: int):
        self.free, self.real = free, torch.save
        monkeypatch.setattr(torch, "save", self.save)

    def save(self, obj, f, *args, **kwargs):
        self.real(obj, self._Writer(f, self), *args, **kwargs)

    class _Writer:
        def __init__(self, f, disk):
            self.f, self.disk = f, disk

        def write(self, data):
            data = bytes(data)
            if len(data) > self.disk.free:
                self.f.write(data[: self.disk.free])
                self.disk.free = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.disk.free -= len(data)
            return self.f.write(data)

        def flush(self):
            self.f.flush()


class SignalMidWrite(FullDisk):
    """torch.save interrupted by a signal's exception (a second Ctrl-C or SIGTERM) once ``free`` bytes are out."""

    def __init__(self, monkeypatch, free: int, exc: BaseException):
        super().__init__(monkeypatch, free)
        self.exc = exc

    class _Writer(FullDisk._Writer):
        def write(self, data):
            if len(bytes(data)) > self.disk.free:
                raise self.disk.exc
            return super().write(data)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Terminated(signal.SIGTERM)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_a_torch_save_is_raised_as_itself(tmp_path, monkeypatch, exc):
    """torch's zip writer raises "unexpected pos" while unwinding; that must not turn a second signal into a
    crash (exit status 1 instead of 130 / 143, seen in CI)."""
    SignalMidWrite(monkeypatch, free=3000, exc=exc)
    with pytest.raises(type(exc)):
        ckpt._save(tmp_path / "rng.pt", {"state": torch.arange(4000)})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    first = _save(tmp_path, 2, keep_last=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    FullDisk(monkeypatch, free=12_000)  # less than one checkpoint
    for step in (4, 2):  # a new step with keep_last=1 (nothing pruned), and the same step saved again
        with pytest.raises(LDMKitError) as info:
            _save(tmp_path, step, keep_last=1, value=100.0)
        message = str(info.value)
        assert "the disk is full" in message and "MB free in" in message, message
        assert f"The previous checkpoint {first} is intact" in message and "--output-dir" in message
        assert "--resume latest" in message
        assert {p.name: p.read_bytes() for p in first.iterdir()} == before
        assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2] and not _hidden(tmp_path)
    assert ckpt.resolve_resume(tmp_path, "latest") == (first, [])


def test_saving_a_step_again_replaces_it_only_once_the_new_one_is_complete(tmp_path):
    _save(tmp_path, 2)
    again = _save(tmp_path, 2, value=5.0)  # e.g. the same step after resuming from an older checkpoint
    assert torch.load(again / "models.pt", weights_only=True)["w"][0] == 7.0 and not _hidden(tmp_path)
    # A kill between commit_folder's two renames leaves the old copy set aside: the next start puts it back.
    partial = tmp_path / "checkpoints" / ".step-00000002.partial"
    partial.mkdir()
    os.replace(again, again.with_name(".step-00000002.old"))
    ckpt.remove_partials(tmp_path)
    assert verify(again) is None and not _hidden(tmp_path)
    # keep_last counts only checkpoints up to the one just written: newer leftovers never push it out.
    _save(tmp_path, 10)
    _save(tmp_path, 4, keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 10]


def test_commit_folder_never_deletes_before_the_rename(tmp_path, monkeypatch):
    final, partial = tmp_path / "final", tmp_path / ".final.partial"
    final.mkdir()
    (final / "a").write_text("old")
    partial.mkdir()
    (partial / "a").write_text("new")
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((Path(a).name, Path(b).name)), real_replace(a, b)))
    commit_folder(partial, final)
    assert calls == [("final", ".final.old"), (".final.partial", "final")]
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


# ------------------------------------------------------------------------------------- a changed recipe


def test_changed_keys_allows_only_what_does_not_change_the_results():
    base = {"output_dir": "a", "seed": 0, "data": {"num_workers": 2, "root": "d"},
            "train": {"lr": 1e-3, "max_steps": 10, "log_every": 10, "lr_schedule": "cosine"},
            "sampling": {"num_inference_steps": 50}}
    safe = {"output_dir": "b", "seed": 0, "data": {"num_workers": 0, "root": "d"},
            "train": {"lr": 1e-3, "max_steps": 10, "log_every": 1, "lr_schedule": "cosine"},
            "sampling": {"num_inference_steps": 2}}
    assert changed_keys(base, safe) == {}
    unsafe = {**safe, "seed": 1, "data": {"num_workers": 0, "root": "e"},
              "train": {**safe["train"], "lr": 2e-3, "max_steps": 20}}
    assert changed_keys(base, unsafe) == {"data.root": ("d", "e"), "seed": (0, 1), "train.lr": (1e-3, 2e-3),
                                          "train.max_steps": (10, 20)}
    constant = {**base, "train": {**base["train"], "lr_schedule": "constant"}}
    longer = {**constant, "train": {**constant["train"], "max_steps": 20}}
    assert changed_keys(constant, longer) == {}  # no schedule depends on max_steps


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return toy_data(tmp / "toy", size=16, variants=1), tiny_autoencoder(tmp / "ae", levels=3)


def test_resuming_with_a_changed_recipe_is_refused_naming_the_keys(toy, tmp_path):
    data, ae = toy
    recipe = ldm_dict(data, ae, tmp_path / "run", max_steps=4, checkpoint_every=2, lr_schedule="constant")
    train_ldm(build_recipe("ldm", recipe))

    def resume(*overrides):
        return train_ldm(build_recipe("ldm", recipe, overrides), resume="latest")

    with pytest.raises(LDMKitError, match=r"train.lr: 0.001 -> 0.002, unet.layers_per_block: 1 -> 2\).*"
                                          r"recipe.yaml.*fresh output_dir"):
        resume("train.lr=2e-3", "unet.layers_per_block=2", "train.log_every=3")
    with pytest.raises(LDMKitError, match=r"train.lr_schedule: 'constant' -> 'cosine'.*train.max_steps: 4 -> 6"):
        resume("train.max_steps=6", "train.lr_schedule=cosine")
    # Only safe keys: it trains on to the new max_steps.
    resume("train.max_steps=6", "train.log_every=2", "sampling.num_inference_steps=1", "data.num_workers=0")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")][-1] == 6


def test_a_full_disk_during_training_stops_with_the_previous_checkpoint_intact(toy, tmp_path, monkeypatch):
    data, ae = toy
    out = tmp_path / "run"
    recipe = build_recipe("ldm", ldm_dict(data, ae, out, max_steps=6, checkpoint_every=2))
    disk = FullDisk(monkeypatch, free=10**9)
    real = disk.save

    def save(obj, f, *args, **kwargs):  # the disk fills up after the first checkpoint
        if ckpt.list_checkpoints(out):
            disk.free = min(disk.free, 50_000)
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(LDMKitError, match="checkpoint .*step-00000004: the disk is full.*step-00000002 is intact"):
        train_ldm(recipe)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and verify(ckpt.checkpoint_dir(out, 2)) is None
    assert not _hidden(out / "checkpoints")


# ------------------------------------------------------------------------------ SIGINT / SIGTERM (the CLI)


def _wait_for_step(out: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        if sum('"loss"' in line for line in lines) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step}: {proc.stderr.read().decode()[-2000:]}")


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """An uninterrupted 12-step run (its vocabulary is the signalled runs' too)."""
    data, ae = toy
    return train_ldm(build_recipe("ldm", ldm_dict(data, ae, tmp_path_factory.mktemp("reference") / "run",
                                                  max_steps=12)))


@pytest.mark.parametrize("signum, code, what", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_a_signal_saves_a_checkpoint_after_the_step_and_exits_with_one_line(toy, reference, tmp_path, signum, code,
                                                                            what):
    data, ae = toy
    recipe = ldm_dict(data, ae, tmp_path / "run", max_steps=12)
    recipe["text"]["tokenizer"] = str(reference.parent / "tokenizer")  # one vocabulary for both runs
    config = write_yaml(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ldmkit", "train", "ldm", "--config", str(config)]
    # Ctrl-C as a terminal sends it: to the whole process group, data loader workers included. They must not
    # die of it: the step being finished needs 8 micro-batches, more than the 2 x 2 the workers prefetch.
    ctrl_c = signum == signal.SIGINT
    workers = ["data.num_workers=2", "train.batch_size=8", "train.gradient_accumulation_steps=8"] if ctrl_c else []
    proc = subprocess.Popen(cmd + workers, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=ctrl_c)
    _wait_for_step(tmp_path / "run", 3, proc)
    if ctrl_c:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == code, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
    assert len(steps) == 1 and 3 <= steps[0] < 12, (steps, stderr[-2000:])  # checkpoint_every is 1000
    folder = ckpt.checkpoint_dir(tmp_path / "run", steps[0])
    assert last == (f"ldmkit train: {what} at step {steps[0]}; checkpoint {folder}. Continue the run with the same "
                    "command and --resume latest."), stderr[-2000:]
    assert "Traceback" not in stderr and verify(folder) is None and not _hidden(tmp_path / "run")
    if signum == signal.SIGINT:
        return  # (the SIGTERM case checks the resume: the checkpoint is the same)
    # The checkpoint continues the run exactly.
    done = subprocess.run(cmd + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"(step {steps[0]})" in done.stderr, done.stderr[-3000:]
    ours, theirs = final_weights(tmp_path / "run" / "final"), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_interrupted_latent_cache_leaves_no_half_built_folder(tmp_path, monkeypatch):
    def encode(run, ae, records, resolution, flip, shard):
        shard.mkdir()
        (shard / "latents.pt").write_bytes(b"half")
        raise KeyboardInterrupt  # Ctrl-C while encoding

    monkeypatch.setattr(latent_cache, "cache_key", lambda *args: "key")
    monkeypatch.setattr(latent_cache, "_encode_shard", encode)
    run = SimpleNamespace(is_main=True, rank=0, world_size=1, barrier=lambda: None)
    with pytest.raises(KeyboardInterrupt):
        latent_cache.build_cache(run, None, tmp_path, [], 16, False, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_second_signal_during_the_checkpoint_stops_at_once_leaving_nothing_half_written(toy, reference, tmp_path):
    data, ae = toy
    recipe = ldm_dict(data, ae, tmp_path / "run", max_steps=12)
    recipe["text"]["tokenizer"] = str(reference.parent / "tokenizer")
    config = write_yaml(tmp_path / "recipe.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDMKIT_TEST_CHECKPOINT_DELAY": "0.3"}
    cmd = [sys.executable, "-m", "ldmkit", "train", "ldm", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(tmp_path / "run", 2, proc)
    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.time() + 60
    while not list((tmp_path / "run" / "checkpoints").glob(".step-*.partial")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # while the stop's checkpoint is being written
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "ldmkit train: terminated (SIGTERM); nothing half-written was left"
    assert ckpt.list_checkpoints(tmp_path / "run") == [] and not _hidden(tmp_path / "run")


def test_a_fresh_run_in_a_folder_with_checkpoints_is_refused(tmp_path):
    # Its checkpoints would mix with the old run's, and --resume latest after a kill would pick the old run's.
    _save(tmp_path, 24)
    with pytest.raises(LDMKitError, match="already holds checkpoints .*step-00000024.*--resume latest.*another "
                                          "output_dir"):
        ckpt.resolve_resume(tmp_path, None)
    assert ckpt.resolve_resume(tmp_path / "new", None) == (None, [])


def test_an_interrupted_tokenizer_save_leaves_no_vocabulary_to_trust(toy, tmp_path, monkeypatch):
    # A resume reuses output_dir/tokenizer when it is there: it must be there whole or not at all.
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt  # Ctrl-C between two files

    monkeypatch.setattr(LDMTokenizer, "save_pretrained", save_pretrained)
    data, ae = toy
    with pytest.raises(KeyboardInterrupt):
        train_ldm(build_recipe("ldm", ldm_dict(data, ae, tmp_path / "run")))
    assert not (tmp_path / "run" / "tokenizer").exists() and not _hidden(tmp_path / "run")


def test_disk_errors_name_the_cause_the_place_and_the_fix(tmp_path):
    with pytest.raises(LDMKitError, match=r"Could not write the run's files: the disk is full \(.* MB free in "
                                          rf"{tmp_path / 'cache'}\)\. Free some space .*--output-dir"):
        with disk_errors("the run's files", tmp_path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "shard.pt"))
    with pytest.raises(LDMKitError, match="disk quota is exceeded"):
        with disk_errors("checkpoint x", tmp_path):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(PermissionError):  # not a full disk: only converted where every write error is ours
        with disk_errors("the run's files", tmp_path):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(LDMKitError, match="Could not write checkpoint x in .*Permission denied.*writable"):
        with disk_errors("checkpoint x", tmp_path, any_error=True):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_a_run_starting_removes_the_temporaries_a_sigkill_left(tmp_path):
    """SIGKILL cannot be cleaned up after: atomic writes' temporaries left in the run folder go at the next
    start (seen in CI: a kill while loss.png was written)."""
    (tmp_path / "samples" / ".final.ab12.tmp").mkdir(parents=True)
    (tmp_path / "samples" / ".final.ab12.tmp" / "x.png").write_bytes(b"half")
    (tmp_path / ".loss.png.pcxt6p6m.tmp").write_bytes(b"half")
    (tmp_path / "loss.png").write_bytes(b"kept")
    ckpt.remove_partials(tmp_path)
    assert not list(tmp_path.rglob(".*")) and (tmp_path / "loss.png").read_bytes() == b"kept"
