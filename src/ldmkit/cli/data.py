"""``ldmkit data emoji --out DIR [--size N] [--font PATH] [--force] [--test-fraction F] [--limit K]``."""

from __future__ import annotations

from ..datasets.emoji import DEFAULT_TEST_FRACTION, build_emoji_dataset
from ..errors import LDMKitError


def add_data_parser(subparsers) -> None:
    """Register ``data`` (with ``emoji``) on an argparse sub-parser collection."""
    data = subparsers.add_parser("data", help="Build training data sets.", description="Build training data sets.")
    kinds = data.add_subparsers(dest="data_kind", metavar="{emoji}")
    kinds.required = True
    text = "Render every emoji of Noto Color Emoji (one glyph each) with its CLDR name as caption, in the " \
           "imagefolder layout with a fixed held-out test split."
    p = kinds.add_parser("emoji", help="captioned emoji images from the Noto Color Emoji font", description=text)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (train/, test/, manifest.json)")
    p.add_argument("--font", metavar="PATH", help="NotoColorEmoji.ttf (default: the distribution's install path)")
    p.add_argument("--force", action="store_true",
                   help="build into a non-empty DIR: its train/, test/ and manifest.json are replaced")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help=f"share of emoji held out, by caption hash (default {DEFAULT_TEST_FRACTION})")
    p.add_argument("--limit", type=int, metavar="K", help="only the first K emoji in code point order (for tests)")
    p.set_defaults(func=run_data)


def run_data(args) -> int:
    """Run what ``args`` (from the ``data`` parser) asks for; returns the exit status."""
    if getattr(args, "data_kind", None) != "emoji":
        raise LDMKitError("Say what to build: `ldmkit data emoji --out DIR`.")
    report = build_emoji_dataset(args.out, size=args.size, font_path=args.font, force=args.force,
                                 test_fraction=args.test_fraction, limit=args.limit)
    dropped = ", ".join(f"{len(c)} {r}" for r, c in sorted(report.dropped.items())) or "none"
    print(f"{report.train + report.test} emoji written to {args.out} ({report.train} train, {report.test} test; "
          f"dropped: {dropped}) in {report.seconds:.1f} s")
    return 0
