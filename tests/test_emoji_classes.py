"""Emoji class labels: Unicode groups/subgroups from emoji-test.txt, the fall-back for emoji newer than the
file, the pooling of small subgroups, and the 'label' column written into an existing dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldmkit import LDMKitError
from ldmkit.cli import main
from ldmkit.datasets import emoji_classes as ec
from ldmkit.training.data import scan_folder

FAKE = """# Version: 99.0
# group: Smileys & Emotion
# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
1F601                                                  ; fully-qualified     # 😁 E0.6 beaming face
# subgroup: face-hat
1F920                                                  ; fully-qualified     # 🤠 E3.0 cowboy hat face
# group: Animals & Nature
# subgroup: animal-bird
1F426                                                  ; fully-qualified     # 🐦 E0.6 bird
# subgroup: animal-mammal
1F415                                                  ; fully-qualified     # 🐕 E0.7 dog
# group: People & Body
# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
"""


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(FAKE, encoding="utf-8")
    return path


def test_lookup_and_the_fallback_for_newer_emoji(fake):
    table, version = ec.read_emoji_test(fake)
    assert version == "99.0" and table[(0x1F600,)] == ("Smileys & Emotion", "face-smiling")
    assert ec.code_points("1f44b-1f3fb.png") == (0x1F44B, 0x1F3FB)
    assert ec.lookup((0x1F44B, 0x1F3FD), table)[1] == "hand-fingers-open"  # a tone the file lacks: the base
    assert ec.lookup((0x1F426, 0x200D, 0x1F525), table)[1] == "animal-bird"  # phoenix (15.1): bird + ZWJ + fire
    assert ec.lookup((0x1F426, 0xFE0F), table)[1] == "animal-bird"
    assert ec.lookup((0x1F9A9,), table) is None
    assert ec.slug("Animals & Nature") == "animals-nature"
    with pytest.raises(LDMKitError, match="unicode-data"):
        ec.find_emoji_test(fake.parent / "missing.txt")


def test_small_subgroups_are_pooled_per_group_then_into_other(fake):
    table, _ = ec.read_emoji_test(fake)
    train = ["1f600.png", "1f601.png", "1f600-fe0f.png", "1f920.png", "1f426.png", "1f415.png", "1f9a9.png"]
    classify = ec.class_table(train, table, min_images=2)
    assert classify("1f600.png") == "face-smiling"  # 3 images: its own class
    assert classify("1f920.png") == "other"  # face-hat pooled: smileys-emotion-other has 1 < 2
    assert classify("1f426.png") == classify("1f415.png") == "animals-nature-other"  # 1 + 1 pooled = 2
    assert classify("1f9a9.png") == "other"  # not in the file, no base
    assert ec.class_table(train, table, min_images=1)("1f920.png") == "face-hat"


def _dataset(folder: Path) -> Path:
    for split, names in (("train", ["1f600", "1f601", "1f426", "1f415"]), ("test", ["1f44b-1f3fb"])):
        (folder / split).mkdir(parents=True)
        rows = [{"file_name": f"{n}.png", "text": n} for n in names]
        (folder / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for n in names:
            (folder / split / f"{n}.png").write_bytes(b"")  # labels need only the names
    (folder / "manifest.json").write_text(json.dumps({"builder": "ldmkit data emoji"}))
    return folder


def test_cli_adds_the_label_column_and_the_training_data_reads_it(fake, tmp_path, capsys):
    folder = _dataset(tmp_path / "emoji")
    assert main(["data", "emoji-labels", str(folder), "--emoji-test", str(fake), "--min-images", "2"]) == 0
    assert "2 classes written" in capsys.readouterr().out
    rows = [json.loads(line) for line in (folder / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["face-smiling", "face-smiling", "animals-nature-other",
                                          "animals-nature-other"]
    assert rows[0]["text"] == "1f600"  # the captions are kept
    test_rows = [json.loads(line) for line in (folder / "test" / "metadata.jsonl").read_text().splitlines()]
    assert test_rows[0]["label"] == "other"  # its subgroup has no training image
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["labels"]["classes"] == {"animals-nature-other": 2, "face-smiling": 2}
    assert manifest["builder"] == "ldmkit data emoji"
    assert main(["data", "emoji-labels", str(tmp_path / "nope"), "--emoji-test", str(fake)]) == 2


def test_the_installed_emoji_test_file():
    try:
        table, version = ec.read_emoji_test()
    except LDMKitError:
        pytest.skip("unicode-data's emoji-test.txt is not installed")
    assert float(version) >= 15.0
    assert table[(0x1F600,)] == ("Smileys & Emotion", "face-smiling")
    assert ec.lookup((0x1F34B, 0x200D, 0x1F7E9), table)[1] == "food-fruit"  # lime (15.1): lemon + green square
    assert ec.lookup((0x1F6B6, 0x200D, 0x27A1, 0xFE0F), table)[1] == "person-activity"  # walking facing right


def test_scan_folder_reads_labels_from_a_column(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    import PIL.Image

    for i in range(3):
        PIL.Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "a", "label": "zebra"}, {"file_name": "1.png", "text": "b", "label": 3},
            {"file_name": "2.png", "text": "c", "label": "ant"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = scan_folder(folder, label_column="label", need_labels=True)
    assert data.class_names == ["3", "ant", "zebra"]  # integers first, then sorted names
    assert [r.label for r in data.records] == [2, 0, 1]
