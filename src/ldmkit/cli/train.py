"""``ldmkit train autoencoder|ldm --config RECIPE.yaml [--resume latest|PATH] [--output-dir DIR] [KEY=VALUE ...]``.

Also what ``accelerate launch -m ldmkit train ...`` and ``torchrun -m ldmkit train ...`` run on every process.
The training modules import accelerate and PyYAML only when a run starts, so this parser is always there and
a missing extra is the one-line message of :func:`_check_extras`.
"""

from __future__ import annotations

import importlib.util
import sys

from ..errors import LDMKitError
from ..training.autoencoder import train_autoencoder
from ..training.faults import TrainingInterrupted, TrainingTerminated
from ..training.ldm import train_ldm
from ..training.recipe import load_recipe

KINDS = {
    "autoencoder": "Train the first stage: a KL or VQ autoencoder (optionally with a patch GAN).",
    "ldm": "Train a latent diffusion model (text, concat/super-resolution or unconditional) on a trained "
           "autoencoder.",
}


def add_train_parser(subparsers) -> None:
    """Register ``train`` (with ``autoencoder`` and ``ldm``) on an argparse sub-parser collection."""
    train = subparsers.add_parser("train", help="Train an autoencoder or a latent diffusion model from a recipe.",
                                  description="Train from a YAML recipe (see recipes/). Values can be overridden "
                                              "with KEY=VALUE or --set KEY=VALUE, e.g. train.lr=2e-4.")
    kinds = train.add_subparsers(dest="train_kind", metavar="{autoencoder,ldm}")
    kinds.required = True
    for kind, text in KINDS.items():
        parser = kinds.add_parser(kind, help=text, description=text)
        parser.add_argument("--config", "-c", required=True, metavar="RECIPE.yaml", help="the run's recipe")
        parser.add_argument("--resume", metavar="latest|PATH",
                            help="continue from the newest intact checkpoint of output_dir ('latest'; a damaged "
                                 "one is skipped) or a checkpoint folder; the recipe must be the run's (logging, "
                                 "checkpoint and sampling keys may change)")
        parser.add_argument("--output-dir", metavar="DIR", help="overrides the recipe's output_dir")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a recipe value (dotted key), repeatable")
        parser.add_argument("dotted", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. train.max_steps=10")
        parser.set_defaults(func=run_train)
    train.set_defaults(func=run_train)


def run_train(args) -> int:
    """Run the training that ``args`` (from the ``train`` parser) describes; returns the exit status."""
    _check_extras()
    kind = getattr(args, "train_kind", None)
    if kind not in KINDS:
        raise LDMKitError("Say what to train: `ldmkit train autoencoder --config ...` or `ldmkit train ldm ...`.")
    overrides = list(getattr(args, "overrides", None) or []) + list(getattr(args, "dotted", None) or [])
    recipe = load_recipe(kind, args.config, overrides, getattr(args, "output_dir", None))
    run = train_autoencoder if kind == "autoencoder" else train_ldm
    try:
        run(recipe, resume=getattr(args, "resume", None))
    except (TrainingInterrupted, TrainingTerminated) as e:
        # Stopped by a signal between two steps, after writing a checkpoint: one line that says where it is.
        # (A signal outside the loop, or a second one, reaches cli.main as KeyboardInterrupt / Terminated.)
        print(f"ldmkit train: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _check_extras() -> None:
    missing = [name for name in ("accelerate", "yaml") if importlib.util.find_spec(name) is None]
    if missing:
        raise LDMKitError(f"Training needs {' and '.join('PyYAML' if m == 'yaml' else m for m in missing)}: "
                          "pip install 'ldmkit[train]'.")
