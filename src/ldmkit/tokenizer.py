"""LDMTokenizer: the BERT WordPiece tokenizer of LDMBert, built on the ``tokenizers`` library.

It gives the same ids as transformers' ``BertTokenizer`` (BERT normalisation: text cleaning, optional
lower-casing and accent stripping, CJK characters split; BERT pre-tokenisation; WordPiece with ``##``
continuations; ``[CLS] ... [SEP]``), reads the published ``tokenizer/`` folder (``vocab.txt``) and the one
transformers 5 writes (``tokenizer.json``), and writes folders that transformers reads back.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import LDMKitError
from .io import atomic_write_text
from .loading.hub import resolve_folder
from .registry import COMPONENTS

logger = logging.getLogger("ldmkit")

VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

DEFAULT_MAX_LENGTH = 77
# transformers writes int(1e30) for "no limit"; such values mean the config does not set a length.
_UNSET_LENGTH = 10**12
# Order fixes the ids of a trained vocabulary: [PAD] = 0 is LDMBert's pad_token_id.
_SPECIAL_ROLES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
_DEFAULT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]"}


class BatchEncoding(dict):
    """``input_ids`` and ``attention_mask``, read as keys or attributes (as transformers' BatchEncoding)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_text(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LDMKitError(f"{path} is not valid JSON ({e}). Re-download or re-save the tokenizer.") from None
    if not isinstance(data, dict):
        raise LDMKitError(f"{path} must hold a JSON object. Re-download or re-save the tokenizer.")
    return data


def _read_json_if_any(path: Path) -> dict | None:
    return _read_json(path) if path.is_file() else None


def read_vocab_txt(path: Path) -> dict[str, int]:
    """One token per line, id = line number (a repeated token keeps its last line, as transformers)."""
    vocab: dict[str, int] = {}
    # Text mode turns \r\n into \n; only \n ends a line (str.splitlines would also split on e.g. \x1c).
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.rstrip("\n")] = index
    return vocab


# transformers' names: diffusers writes ["transformers", "BertTokenizer"]; Hub repos also say BertTokenizerFast.
@COMPONENTS.register(("transformers", "BertTokenizer"), aliases=[("transformers", "BertTokenizerFast")])
class LDMTokenizer:
    """BERT WordPiece tokenizer, called as diffusers calls transformers' one:
    ``tokenizer(prompts, padding="max_length", max_length=77)``.

    ``vocab`` maps tokens to ids. ``strip_accents=None`` strips accents exactly when lower-casing.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        special_tokens: dict[str, str] | None = None,
        added_tokens: Sequence[dict] = (),
    ):
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        if not vocab:
            raise LDMKitError("LDMTokenizer needs a non-empty vocabulary.")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.model_max_length = int(model_max_length)
        self.special_tokens = {**_DEFAULT_SPECIALS, **(special_tokens or {})}

        tok = Tokenizer(WordPiece(dict(vocab), unk_token=self.special_tokens["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=self.tokenize_chinese_chars, strip_accents=strip_accents,
            lowercase=self.do_lower_case)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # Special tokens are matched verbatim in the raw text before normalisation, as transformers does
        # ("a [MASK] cat" gives the [MASK] id; "[mask]" does not).
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in dict.fromkeys(self.special_tokens.values())])
        for entry in added_tokens:
            if entry.get("content") in self.special_tokens.values():
                continue
            token = AddedToken(entry["content"], single_word=entry.get("single_word", False),
                               lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                               normalized=entry.get("normalized", True), special=entry.get("special", False))
            (tok.add_special_tokens if entry.get("special") else tok.add_tokens)([token])
        self.cls_token_id = tok.token_to_id(self.special_tokens["cls_token"])
        self.sep_token_id = tok.token_to_id(self.special_tokens["sep_token"])
        self.pad_token_id = tok.token_to_id(self.special_tokens["pad_token"])
        self.unk_token_id = tok.token_to_id(self.special_tokens["unk_token"])
        self.mask_token_id = tok.token_to_id(self.special_tokens["mask_token"])
        # Kept so that tokenizer.json is complete; __call__ adds [CLS]/[SEP] itself to count truncation.
        cls, sep = self.special_tokens["cls_token"], self.special_tokens["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, self.cls_token_id), (sep, self.sep_token_id)])
        self._tokenizer = tok

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, **overrides) -> LDMTokenizer:
        """Load from a folder (or Hub id) holding ``vocab.txt`` and/or ``tokenizer.json`` plus
        ``tokenizer_config.json``. ``overrides`` (e.g. ``model_max_length=77``) replace config values."""
        patterns = None if subfolder is None else [f"{subfolder}/*"]
        folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only, allow_patterns=patterns)
        if subfolder:
            folder = folder / subfolder
        return cls.from_folder(folder, **overrides)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, torch_dtype=None, variant: str | None = None,
                    **overrides) -> LDMTokenizer:
        """Load from a local folder. ``torch_dtype`` and ``variant`` are accepted (and meaningless for a
        tokenizer) so that pipeline loading can treat every component alike."""
        folder = Path(folder)
        config = _read_json_if_any(folder / CONFIG_FILE) or {}
        specials_map = _read_json_if_any(folder / SPECIAL_TOKENS_FILE) or {}
        backend = _read_json_if_any(folder / TOKENIZER_FILE)

        # As transformers 5: tokenizer.json's vocabulary wins over vocab.txt when both exist.
        if backend is not None:
            vocab = cls._vocab_from_tokenizer_json(backend, folder / TOKENIZER_FILE)
        elif (folder / VOCAB_FILE).is_file():
            vocab = read_vocab_txt(folder / VOCAB_FILE)
        else:
            raise LDMKitError(
                f"No tokenizer vocabulary in {folder}: expected {VOCAB_FILE} or {TOKENIZER_FILE}. Point to "
                "the model's tokenizer/ folder, or re-save the tokenizer with save_pretrained.")

        # Flags come from tokenizer_config.json (as transformers); tokenizer.json's normaliser fills gaps.
        normalizer = (backend or {}).get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            normalizer = {}
        options = {
            "do_lower_case": config.get("do_lower_case", normalizer.get("lowercase", True)),
            "strip_accents": config.get("strip_accents", normalizer.get("strip_accents")),
            "tokenize_chinese_chars": config.get("tokenize_chinese_chars",
                                                 normalizer.get("handle_chinese_chars", True)),
        }
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int | float) or max_length >= _UNSET_LENGTH:
            max_length = DEFAULT_MAX_LENGTH
        options["model_max_length"] = int(max_length)

        specials = {}
        for role in _SPECIAL_ROLES:
            text = _token_text(config.get(role)) or _token_text(specials_map.get(role))
            if text is not None:
                specials[role] = text
        options["special_tokens"] = specials
        options["added_tokens"] = (backend or {}).get("added_tokens") or []
        options.update(overrides)
        return cls(vocab, **options)

    @staticmethod
    def _vocab_from_tokenizer_json(data: dict, path: Path) -> dict[str, int]:
        model = data.get("model") or {}
        kind = model.get("type", "WordPiece")
        vocab = model.get("vocab")
        if kind != "WordPiece" or not isinstance(vocab, dict) or not vocab:
            raise LDMKitError(f"{path} holds a {kind} tokenizer, not BERT's WordPiece. LDMBert needs the "
                              "BERT tokenizer saved with the model (tokenizer/vocab.txt).")
        return {str(token): int(index) for token, index in vocab.items()}

    # ------------------------------------------------------------------------------------------ training

    @classmethod
    def train_from_captions(cls, captions: Iterable[str], vocab_size: int = 2000,
                            model_max_length: int = 24, do_lower_case: bool = True) -> LDMTokenizer:
        """Learn a WordPiece vocabulary from ``captions`` (special tokens get ids 0-4, [PAD] = 0)."""
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece
        from tokenizers.trainers import WordPieceTrainer

        captions = cls._check_texts(captions)
        tok = Tokenizer(WordPiece(unk_token=_DEFAULT_SPECIALS["unk_token"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=do_lower_case)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                   special_tokens=[_DEFAULT_SPECIALS[r] for r in _SPECIAL_ROLES])
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tok.get_vocab(with_added_tokens=True), do_lower_case=do_lower_case,
                   model_max_length=model_max_length)

    # ------------------------------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @staticmethod
    def _check_texts(texts) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if not isinstance(texts, Iterable):
            raise LDMKitError(f"Prompts must be a string or a list of strings, got {type(texts).__name__}.")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise LDMKitError(f"Prompt {i} is a {type(text).__name__}, not a string: {text!r}. "
                                  "Pass text prompts (use '' for an empty prompt).")
        return texts

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of one text, without [CLS]/[SEP]."""
        return self._tokenizer.encode(self._check_texts(text)[0], add_special_tokens=False).tokens

    def __call__(self, texts: str | Sequence[str], padding: bool | str = "max_length",
                 max_length: int | None = None, truncation: bool = True,
                 return_tensors: str | None = "pt") -> BatchEncoding:
        """Token ids ``[CLS] tokens [SEP] [PAD]...`` and the attention mask (1 on real tokens).

        ``padding``: "max_length" (to ``max_length``), "longest"/True (to the longest prompt) or
        False/"do_not_pad". With ``truncation`` a prompt is cut to ``max_length`` ids, [CLS]/[SEP] included,
        and a warning says how many tokens were dropped. ``return_tensors="pt"`` gives LongTensors,
        ``None`` lists.
        """
        texts = self._check_texts(texts)
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise LDMKitError(f"max_length={max_length} leaves no room for [CLS] and [SEP]; use at least 2.")
        if padding not in (True, False, "max_length", "longest", "do_not_pad"):
            raise LDMKitError(f"padding={padding!r}: use 'max_length', 'longest' or False.")
        if return_tensors not in ("pt", None):
            raise LDMKitError(f"return_tensors={return_tensors!r}: use 'pt' or None.")

        bodies = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]
        room = max_length - 2
        too_long = [(i, len(body) - room) for i, body in enumerate(bodies) if len(body) > room]
        if too_long and truncation:
            self._warn_truncated(too_long, bodies, room, max_length)
            bodies = [body[:room] for body in bodies]
        elif too_long:
            logger.warning("%d prompt(s) are longer than max_length=%d tokens and truncation=False; the text "
                           "encoder cannot read them.", len(too_long), max_length)
        ids = [[self.cls_token_id, *body, self.sep_token_id] for body in bodies]

        if padding == "max_length":
            target = max(max_length, *(len(x) for x in ids)) if ids else max_length
        elif padding in (True, "longest"):
            target = max((len(x) for x in ids), default=0)
        else:
            target = None
        mask = [[1] * len(x) + [0] * ((target or len(x)) - len(x)) for x in ids]
        ids = [x + [self.pad_token_id] * ((target or len(x)) - len(x)) for x in ids]

        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise LDMKitError("Prompts tokenize to different lengths; pass padding='max_length' or "
                                  "'longest' to get one tensor.")
            width = len(ids[0]) if ids else max_length
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long).reshape(len(ids), width),
                                 attention_mask=torch.tensor(mask, dtype=torch.long).reshape(len(ids), width))
        return BatchEncoding(input_ids=ids, attention_mask=mask)

    def _warn_truncated(self, too_long: list[tuple[int, int]], bodies: list[list[int]], room: int,
                        max_length: int) -> None:
        details = []
        for i, dropped in too_long[:3]:
            removed = self.decode(bodies[i][room:])
            removed = removed if len(removed) <= 60 else removed[:57] + "..."
            details.append(f"prompt {i} lost its last {dropped} token{'s' * (dropped != 1)} ({removed!r})")
        more = f" and {len(too_long) - 3} more prompt(s)" if len(too_long) > 3 else ""
        logger.warning("The text encoder reads at most %d tokens ([CLS] and [SEP] included), so %s%s.",
                       max_length, "; ".join(details), more)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids (a list or a 1-D tensor); [CLS]/[SEP]/[PAD] dropped by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json atomically; both
        transformers' BertTokenizer and LDMTokenizer read the folder back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        by_id = sorted(self._tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        if [index for _, index in by_id] != list(range(len(by_id))):
            logger.warning("The vocabulary's ids are not consecutive; vocab.txt renumbers them "
                           "(tokenizer.json keeps the real ids and is what transformers 5 reads).")
        specials = dict(self.special_tokens)
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": True,
            **specials,
        }
        atomic_write_text(folder / VOCAB_FILE, "".join(f"{token}\n" for token, _ in by_id))
        atomic_write_text(folder / TOKENIZER_FILE, self._tokenizer.to_str(pretty=True) + "\n")
        atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        atomic_write_text(folder / SPECIAL_TOKENS_FILE, json.dumps(specials, indent=2, sort_keys=True) + "\n")

    def __repr__(self) -> str:
        return (f"LDMTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
                f"strip_accents={self.strip_accents}, model_max_length={self.model_max_length})")


__all__ = ["BatchEncoding", "LDMTokenizer", "read_vocab_txt"]
