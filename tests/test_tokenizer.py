"""LDMTokenizer gives transformers' BertTokenizer ids, reads both on-disk layouts and writes one it reads."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ldmkit.errors import LDMKitError
from ldmkit.tokenizer import LDMTokenizer

transformers = pytest.importorskip("transformers")

VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(".,!?'\"-()") + ["红", "猫", "一", "只", "的", "中"]
    + ["a", "the", "cat", "dog", "photo", "of", "on", "mat", "tree", "red", "sitting", "play", "run", "paint",
       "oil", "cafe", "Cafe", "café", "naive", "naïve", "resume", "résumé", "Cat", "Café", "A", "Photo"]
    + ["##s", "##ing", "##ed", "##er", "##n", "##é", "##t", "##a"]
)

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT!",
    "the cats, sitting on the mat.",
    "café naïve résumé",
    "Café NAÏVE Résumé",
    "一只红猫",
    "a 红猫 on the mat",
    "红猫的tree",
    "xyzzy qwerty",  # no piece covers these words: [UNK]
    "",
    "   ",
    "\t\n",
    "a [MASK] cat",  # special token matched verbatim
    "a [mask] cat",
    "painting played runner runs",
    "\x00cat\u200b dog\x7f",  # control characters are cleaned
    "🐱 cat",
    "don't stop-motion (cat)?",
    "a" * 150,  # longer than WordPiece's 100 characters per word: [UNK]
    "a cat " * 60,  # longer than 77 tokens: truncated
]

FLAGS = [
    {},
    {"do_lower_case": False},
    {"do_lower_case": True, "strip_accents": False},
    {"do_lower_case": False, "strip_accents": True},
    {"tokenize_chinese_chars": False},
]


def write_vocab_folder(folder, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **config}))


def reference(folder):
    return transformers.BertTokenizer.from_pretrained(str(folder))


def assert_same(ours, theirs, prompts, max_length=77):
    a = ours(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    b = theirs(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    assert a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b["input_ids"]), (a.input_ids, b["input_ids"])
    assert torch.equal(a.attention_mask, b["attention_mask"])


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "-")
def test_ids_match_transformers(tmp_path, flags):
    write_vocab_folder(tmp_path, **flags)
    ours, theirs = LDMTokenizer.from_pretrained(tmp_path), reference(tmp_path)
    assert_same(ours, theirs, PROMPTS)
    assert_same(ours, theirs, PROMPTS, max_length=8)
    for prompt in PROMPTS:  # one by one too: batching must not change anything
        assert_same(ours, theirs, [prompt])


@pytest.mark.parametrize("flags", FLAGS[:2], ids=["default", "cased"])
def test_ids_match_transformers_python_tokenizer(tmp_path, flags):
    """transformers 4's default (pure Python) BertTokenizer, with which the published pipeline ran."""
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    write_vocab_folder(tmp_path, **flags)
    theirs = legacy.BertTokenizerLegacy.from_pretrained(str(tmp_path))
    assert_same(LDMTokenizer.from_pretrained(tmp_path), theirs, PROMPTS)


def test_unknown_and_empty(tmp_path):
    write_vocab_folder(tmp_path)
    tok = LDMTokenizer.from_pretrained(tmp_path)
    unk, cls, sep, pad = (VOCAB.index(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"))
    out = tok(["", "xyzzy"], return_tensors=None)
    assert out.input_ids[0] == [cls, sep] + [pad] * 75
    assert out.input_ids[1][:3] == [cls, unk, sep]
    assert out.attention_mask[1] == [1, 1, 1] + [0] * 74
    assert tok.pad_token_id == pad and tok.model_max_length == 77 and tok.vocab_size == len(VOCAB)


def test_truncation_warns_with_dropped_count(tmp_path, caplog):
    write_vocab_folder(tmp_path)
    tok = LDMTokenizer.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        ids = tok(["a cat " * 40, "a cat"], max_length=77).input_ids  # 80 tokens + [CLS]/[SEP]
    assert ids.shape == (2, 77) and ids[0, -1].item() == tok.sep_token_id
    assert "prompt 0 lost its last 5 tokens" in caplog.text
    assert "prompt 1" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        tok(["a cat"])
    assert caplog.text == ""


def test_save_pretrained_round_trip_into_transformers(tmp_path):
    write_vocab_folder(tmp_path / "src", do_lower_case=False, strip_accents=True)
    ours = LDMTokenizer.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    theirs = reference(tmp_path / "out")
    assert_same(ours, theirs, PROMPTS)
    assert_same(LDMTokenizer.from_pretrained(tmp_path / "out"), theirs, PROMPTS)
    # Only vocab.txt (+ config), as transformers 4 and the published checkpoint have it.
    (tmp_path / "out" / "tokenizer.json").unlink()
    assert_same(LDMTokenizer.from_pretrained(tmp_path / "out"), reference(tmp_path / "out"), PROMPTS)


def test_loads_tokenizer_json_only_as_transformers_5_writes_it(tmp_path):
    write_vocab_folder(tmp_path / "src", do_lower_case=False)
    theirs = reference(tmp_path / "src")
    theirs.save_pretrained(str(tmp_path / "t5"))
    assert not (tmp_path / "t5" / "vocab.txt").exists()
    ours = LDMTokenizer.from_pretrained(tmp_path / "t5")
    assert ours.model_max_length == 77 and not ours.do_lower_case
    assert_same(ours, theirs, PROMPTS)


def test_vocab_txt_only(tmp_path):
    (tmp_path / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB), encoding="utf-8")
    ours = LDMTokenizer.from_pretrained(tmp_path)
    assert ours.model_max_length == 77
    # The pipeline loader calls every component's from_folder with these.
    loaded = LDMTokenizer.from_folder(tmp_path, torch_dtype=torch.float16, variant=None)
    assert loaded.vocab_size == len(VOCAB)
    assert_same(ours, reference(tmp_path), PROMPTS)


def test_decode(tmp_path):
    write_vocab_folder(tmp_path)
    tok = LDMTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok(["the cats, sitting"]).input_ids[0]) == "the cats, sitting"


def test_errors(tmp_path):
    with pytest.raises(LDMKitError, match="vocab.txt"):
        LDMTokenizer.from_pretrained(tmp_path)
    write_vocab_folder(tmp_path)
    tok = LDMTokenizer.from_pretrained(tmp_path)
    with pytest.raises(LDMKitError, match="not a string"):
        tok(["a cat", None])
    with pytest.raises(LDMKitError, match="string"):
        tok(3)


def test_train_from_captions(tmp_path):
    captions = ["a red cat sitting on a mat", "a blue dog playing", "the red dog runs", "a cat and a dog"] * 5
    tok = LDMTokenizer.train_from_captions(captions, vocab_size=120, model_max_length=24)
    assert tok.pad_token_id == 0 and tok.model_max_length == 24 and tok.vocab_size <= 120
    ids = tok(["a red cat"]).input_ids
    assert ids.shape == (1, 24) and tok.unk_token_id not in ids[0].tolist()
    tok.save_pretrained(tmp_path)
    assert_same(tok, reference(tmp_path), captions[:4] + ["an unseen zebra"], max_length=24)
