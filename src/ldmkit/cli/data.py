"""``ldmkit data emoji --out DIR [--size N] [--font PATH] [--force] [--test-fraction F] [--limit K]
[--no-labels] [--emoji-test PATH]`` and ``ldmkit data emoji-labels DIR`` (labels for an existing build)."""

from __future__ import annotations

from ..datasets.emoji import DEFAULT_TEST_FRACTION, build_emoji_dataset
from ..datasets.emoji_classes import DEFAULT_MIN_IMAGES, add_labels
from ..errors import LDMKitError


def add_data_parser(subparsers) -> None:
    """Register ``data`` (with ``emoji``) on an argparse sub-parser collection."""
    data = subparsers.add_parser("data", help="Build training data sets.", description="Build training data sets.")
    kinds = data.add_subparsers(dest="data_kind", metavar="{emoji,emoji-labels}")
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
    p.add_argument("--no-labels", action="store_true",
                   help="skip the class labels (the 'label' column: Unicode subgroups, from emoji-test.txt)")
    p.add_argument("--emoji-test", metavar="PATH", help="Unicode's emoji-test.txt (default: unicode-data's)")
    p.set_defaults(func=run_data)
    text = "Add the class labels (Unicode emoji subgroups; small ones pooled per group) as the 'label' column " \
           "of an emoji dataset's metadata.jsonl files; the images are not touched. See docs/emoji-classes.md."
    q = kinds.add_parser("emoji-labels", help="class labels for an emoji dataset already built", description=text)
    q.add_argument("folder", metavar="DIR", help="a folder `ldmkit data emoji` built")
    q.add_argument("--emoji-test", metavar="PATH", help="Unicode's emoji-test.txt (default: unicode-data's)")
    q.add_argument("--min-images", type=int, default=DEFAULT_MIN_IMAGES,
                   help=f"a subgroup with fewer training images is pooled (default {DEFAULT_MIN_IMAGES})")
    q.set_defaults(func=run_data)


def run_data(args) -> int:
    """Run what ``args`` (from the ``data`` parser) asks for; returns the exit status."""
    kind = getattr(args, "data_kind", None)
    if kind == "emoji-labels":
        if args.min_images < 1:
            raise LDMKitError(f"--min-images must be at least 1, not {args.min_images}.")
        summary = add_labels(args.folder, args.emoji_test, args.min_images)
        print(f"{len(summary['classes'])} classes written to the 'label' column in {args.folder} (Emoji "
              f"{summary['emoji_version']} from {summary['source']}; {summary['not_in_file']} emoji by their base)")
        return 0
    if kind != "emoji":
        raise LDMKitError("Say what to build: `ldmkit data emoji --out DIR`.")
    report = build_emoji_dataset(args.out, size=args.size, font_path=args.font, force=args.force,
                                 test_fraction=args.test_fraction, limit=args.limit,
                                 labels=False if args.no_labels else None, emoji_test=args.emoji_test)
    dropped = ", ".join(f"{len(c)} {r}" for r, c in sorted(report.dropped.items())) or "none"
    print(f"{report.train + report.test} emoji written to {args.out} ({report.train} train, {report.test} test; "
          f"dropped: {dropped}) in {report.seconds:.1f} s"
          + (f"; {len(report.labels['classes'])} classes in the 'label' column" if report.labels else ""))
    return 0
