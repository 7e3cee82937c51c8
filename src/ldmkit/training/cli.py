"""``ldmkit train autoencoder|ldm --config RECIPE.yaml [--resume latest|PATH] [--output-dir DIR] [KEY=VALUE ...]``.

The main CLI registers this with :func:`add_train_parser`; ``python -m ldmkit.training.cli train ...`` runs
it on its own (also under ``accelerate launch`` or ``torchrun``).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LDMKitError

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
                            help="continue from the newest checkpoint of output_dir ('latest') or a checkpoint folder")
        parser.add_argument("--output-dir", metavar="DIR", help="overrides the recipe's output_dir")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a recipe value (dotted key), repeatable")
        parser.add_argument("dotted", nargs="*", metavar="KEY=VALUE", help="more overrides, e.g. train.max_steps=10")
        parser.set_defaults(func=run_train)
    train.set_defaults(func=run_train)


def run_train(args) -> int:
    """Run the training that ``args`` (from the ``train`` parser) describes; returns the exit status."""
    _check_extras()
    from .autoencoder import train_autoencoder
    from .ldm import train_ldm
    from .recipe import load_recipe

    kind = getattr(args, "train_kind", None)
    if kind not in KINDS:
        raise LDMKitError("Say what to train: `ldmkit train autoencoder --config ...` or `ldmkit train ldm ...`.")
    overrides = list(getattr(args, "overrides", None) or []) + list(getattr(args, "dotted", None) or [])
    recipe = load_recipe(kind, args.config, overrides, getattr(args, "output_dir", None))
    run = train_autoencoder if kind == "autoencoder" else train_ldm
    run(recipe, resume=getattr(args, "resume", None))
    return 0


def _check_extras() -> None:
    import importlib.util

    missing = [name for name in ("accelerate", "yaml") if importlib.util.find_spec(name) is None]
    if missing:
        raise LDMKitError(f"Training needs {' and '.join('PyYAML' if m == 'yaml' else m for m in missing)}: "
                          "pip install 'ldmkit[train]'.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldmkit.training.cli")
    sub = parser.add_subparsers(dest="command", metavar="train")
    sub.required = True
    add_train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LDMKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
