"""Resuming with a different recipe: a change that would change the results is refused, naming the keys.

A checkpoint keeps the recipe it was trained with (``recipe.yaml``). On resume the current recipe is compared
with it key by key. Keys that only change what is logged, saved or sampled, or where the files are, may
change; everything else (the data, the models, the optimizer, the schedule, the seed, the precision, ...)
would make the resumed run differ from the run it continues, so it is refused rather than silently mixed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LDMKitError
from .recipe import Recipe, build_recipe, to_dict

logger = logging.getLogger("ldmkit.training")

RECIPE_FILE = "recipe.yaml"

# Keys that change when and what is logged / saved / sampled, where files are, or memory and time, never the
# weights.
SAFE_KEYS = frozenset({
    "output_dir", "data.num_workers", "data.latent_cache_dir",
    "train.log_every", "train.checkpoint_every", "train.keep_last", "train.sample_every", "train.eval_every",
    "train.progress_bar",
    # Recomputes activations in backward: the same numbers (tests/test_compat_models.py checks bit-identity).
    "train.gradient_checkpointing",
})
SAFE_SECTIONS = ("sampling.",)


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (lists stay values)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_safe(key: str, old: dict, new: dict) -> bool:
    """Whether ``key`` may differ between the checkpoint's recipe ``old`` and ``new`` (flattened)."""
    if key in SAFE_KEYS or key.startswith(SAFE_SECTIONS):
        return True
    # The cosine schedule runs over max_steps (trainer.lr_factor); a constant one (after warm-up) does not.
    return key == "train.max_steps" and old.get("train.lr_schedule") == new.get("train.lr_schedule") == "constant"


def changed_keys(old: dict, new: dict) -> dict[str, tuple[object, object]]:
    """The keys whose values differ and would change the results: key -> (old, new)."""
    old, new = flatten(old), flatten(new)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not is_safe(k, old, new)}


def check_recipe(checkpoint: Path, recipe: Recipe) -> None:
    """Refuse to resume from ``checkpoint`` with ``recipe`` if a key that matters changed."""
    import yaml

    file = Path(checkpoint) / RECIPE_FILE
    if not file.is_file():
        logger.warning("Checkpoint %s keeps no %s (an older ldmkit wrote it): cannot check that the recipe is the "
                       "one it was trained with.", checkpoint, RECIPE_FILE)
        return
    try:
        # Read through build_recipe so that keys added since (with their defaults) compare equal.
        saved = to_dict(build_recipe(recipe.kind, yaml.safe_load(file.read_text(encoding="utf-8")) or {},
                                     where=str(file)))
    except (LDMKitError, yaml.YAMLError) as e:
        raise LDMKitError(f"Cannot resume from {checkpoint}: its recipe cannot be read ({e}). Resume with the "
                          "ldmkit version that started the run, or start a new run without --resume.") from None
    changes = changed_keys(saved, yaml.safe_load(yaml.safe_dump(to_dict(recipe))))
    if changes:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise LDMKitError(
            f"Cannot resume from {checkpoint}: the recipe changed in ways that would change the results "
            f"({listed}). Resume with the recipe the run was trained with ({file}), or start a new run in a fresh "
            f"output_dir. Keys that may change on resume: {', '.join(sorted(SAFE_KEYS))}, sampling.*, and "
            "train.max_steps with lr_schedule constant.")
