"""``ldmkit data emoji``: captions, drops, split, layout, atomic writes and --force on a small subset.

Rendering needs the Noto Color Emoji font (`apt-get install fonts-noto-color-emoji`) and the `data` extra
(`pip install 'ldmkit[data]'`); without them those tests skip. Caption, split and error tests always run.
"""

from __future__ import annotations

import argparse
import json

import pytest

from ldmkit.cli.data import add_data_parser
from ldmkit.datasets import emoji as ed
from ldmkit.errors import LDMKitError

SIZE = 32
WANTED = ("red apple", "grinning face with big eyes", "woman juggling medium skin tone", "flag united states",
          "flag england", "keycap #", "woman juggling")


def _font_or_skip():
    for module in ("emoji", "fontTools"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install 'ldmkit[data]'")
    try:
        return ed.find_font()
    except LDMKitError:
        pytest.skip("Noto Color Emoji is not installed: apt-get install fonts-noto-color-emoji")


def _subset() -> list[ed.Emoji]:
    everything = ed.emoji_list()
    chosen = everything[:30] + [e for e in everything[30:] if e.caption in WANTED]
    # Synthetic rejects: nothing to draw, a sequence the font has no ligature for, a second "red apple".
    return chosen + [ed.Emoji("\u200d", "zero width joiner"), ed.Emoji("\U0001f34e\U0001f34f", "two apples"),
                     ed.Emoji("\U0001f34f", "red apple")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    _font_or_skip()
    out = tmp_path_factory.mktemp("emoji") / "ds"
    report = ed.build_emoji_dataset(out, size=SIZE, test_fraction=0.3, items=_subset())
    return out, report


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------- no font needed
def test_captions_from_cldr_names():
    assert ed.caption_of(":red_apple:", "\U0001f34e") == "red apple"
    assert ed.caption_of(":woman_juggling_medium_skin_tone:", "x") == "woman juggling medium skin tone"
    assert ed.caption_of(":United_States:", "\U0001f1fa\U0001f1f8") == "flag united states"
    assert ed.caption_of(":Côte_d’Ivoire:", "\U0001f1e8\U0001f1ee") == "flag côte d'ivoire"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert ed.caption_of(":England:", england) == "flag england"


def test_split_is_a_pure_function_of_the_caption():
    fraction = 0.05
    assert ed.is_test("red apple", fraction) == ed.is_test("red apple", fraction)
    # Every skin tone of an emoji lands with its base: a held-out emoji is not seen in another tone.
    base = ed.is_test("woman juggling", 0.5)
    assert all(ed.is_test(f"woman juggling {tone}", 0.5) == base for tone in ed.SKIN_TONES)
    assert not any(ed.is_test(f"caption {i}", 0.0) for i in range(100))
    share = sum(ed.is_test(f"caption {i}", fraction) for i in range(4000)) / 4000
    assert 0.03 < share < 0.07


def test_missing_font_says_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(LDMKitError, match="apt-get install fonts-noto-color-emoji") as info:
        ed.build_emoji_dataset(tmp_path / "out", font_path=str(tmp_path / "NotoColorEmoji.ttf"))
    assert "--font PATH" in str(info.value)
    monkeypatch.setattr(ed, "FONT_CANDIDATES", (str(tmp_path / "nowhere.ttf"),))
    monkeypatch.setattr(ed, "_fontconfig_paths", lambda: [])
    with pytest.raises(LDMKitError, match="apt-get install fonts-noto-color-emoji"):
        ed.find_font()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- with the font
def test_layout_and_manifest(built):
    out, report = built
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    rows = {split: _rows(out / split) for split in ("train", "test")}
    assert report.train == len(rows["train"]) > 0 and report.test == len(rows["test"]) > 0
    assert manifest["count"] == {"train": report.train, "test": report.test, "total": report.train + report.test}
    assert manifest["size"] == SIZE and len(manifest["font"]["sha256"]) == 64
    from PIL import Image

    for split, split_rows in rows.items():
        names = {r["file_name"] for r in split_rows}
        assert names == {p.name for p in (out / split).glob("*.png")}  # every image listed, nothing extra
        for row in split_rows:
            with Image.open(out / split / row["file_name"]) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
            assert ed.is_test(row["text"], 0.3) == (split == "test")
    assert not list(out.rglob("*.tmp"))


def test_captions_present_once(built):
    out, _ = built
    captions = [r["text"] for split in ("train", "test") for r in _rows(out / split)]
    assert set(WANTED) <= set(captions)
    assert len(captions) == len(set(captions))


def test_red_apple_is_red(built):
    out, _ = built
    import numpy as np
    from PIL import Image

    row = next(r for split in ("train", "test") for r in _rows(out / split) if r["text"] == "red apple")
    split = "test" if ed.is_test("red apple", 0.3) else "train"
    pixels = np.asarray(Image.open(out / split / row["file_name"])).reshape(-1, 3).astype(int)
    ink = pixels[(pixels < 240).any(axis=1)]  # not background
    red = (ink[:, 0] > 150) & (ink[:, 1] < 110) & (ink[:, 2] < 110)
    assert len(ink) > SIZE * SIZE // 3 and red.mean() > 0.5
    assert (pixels[0] == 255).all()  # a corner is white background


def test_rejects_are_dropped_by_reason(built):
    _, report = built
    assert report.dropped["blank"] == ["zero width joiner"]
    assert report.dropped["multi_glyph"] == ["two apples"]
    assert report.dropped["duplicate_caption"] == ["red apple"]


def test_same_input_same_dataset(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    ed.build_emoji_dataset(again, size=SIZE, test_fraction=0.3, items=_subset())
    for split in ("train", "test"):
        assert (again / split / "metadata.jsonl").read_bytes() == (out / split / "metadata.jsonl").read_bytes()
        for row in _rows(out / split):
            assert (again / split / row["file_name"]).read_bytes() == (out / split / row["file_name"]).read_bytes()


def test_cli_limit_and_force(tmp_path, capsys):
    _font_or_skip()
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "ds"
    argv = ["data", "emoji", "--size", "16", "--out", str(out), "--limit", "8", "--test-fraction", "0"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0 and "8 emoji written" in capsys.readouterr().out
    assert len(_rows(out / "train")) == 8 and _rows(out / "test") == []

    (out / "train" / "stale.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LDMKitError, match="--force"):
        args.func(args)
    args = parser.parse_args(argv + ["--force"])
    assert args.func(args) == 0
    assert not (out / "train" / "stale.png").exists()  # the old dataset is replaced ...
    assert (out / "notes.txt").read_text() == "mine"  # ... and nothing else in DIR is touched


def test_interrupted_build_leaves_no_partial_files(tmp_path, monkeypatch):
    _font_or_skip()
    real_save, saved = ed.save_png, []

    def save_then_fail(image, dest):
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(image, dest)
        saved.append(dest)

    monkeypatch.setattr(ed, "save_png", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ed.build_emoji_dataset(tmp_path / "ds", size=SIZE, limit=10)
    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    assert sorted(files) == sorted(saved)  # finished images only: no temp file, no metadata, no manifest
