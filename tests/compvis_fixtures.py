"""Shared helpers for the tests of original CompVis checkpoints (tests/test_compvis_*.py).

The fixtures are the tiny CompVis checkpoints with reference outputs of the original code in
``../shared/reference/compvis`` (override with ``LDMKIT_COMPVIS_FIXTURES``); see their README. Without them
the tests skip, except under CI (``CI=true``), where they fail: there a missing folder is a broken setup,
and a skip would silently drop every check against the original code.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from ldmkit import DiffusionPipeline, LDMTokenizer

FIXTURES = Path(os.environ.get("LDMKIT_COMPVIS_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "reference" / "compvis"))
FAMILIES = ("txt2img", "superres", "uncond", "cin", "inpainting")
RUNS = ("ddim_eta0", "ddim_eta1")
SEED = 1234  # torch.manual_seed(1234) before every recorded sampler call
GUIDED = {"txt2img": 3.0, "cin": 3.0}
TOLERANCE = 1e-5  # relative to the largest magnitude of the reference tensor


def single_thread():
    """Module fixture body: one torch thread. The references were computed with one; and on a busy 2-core
    machine two threads per tiny op spin against each other (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def require_fixtures(folder: Path = FIXTURES, environ: Mapping[str, str] = os.environ) -> None:
    """Return if ``folder`` holds the fixtures; else skip the calling test, or fail it under CI."""
    if (folder / "manifest.json").is_file():
        return
    message = (f"CompVis fixtures not found at {folder} (put them in ../shared/reference/compvis or point "
               "LDMKIT_COMPVIS_FIXTURES at them)")
    if environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"{message}; CI=true, where they are required", pytrace=False)
    pytest.skip(message)


# Marks a test (or, as pytestmark, a module) as needing the fixtures: conftest.py's fixture of this name
# calls require_fixtures.
requires_fixtures = pytest.mark.usefixtures("compvis_fixtures_present")

# A 1000-token WordPiece vocabulary with BERT's special-token ids ([PAD] 0, [CLS] 101, [SEP] 102): the ids
# of the fixture's prompts are written as words "w<id>".
_SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
VOCAB = [_SPECIAL.get(i, f"w{i}") for i in range(1000)]


def checkpoint(family: str, kind: str = "ckpt") -> Path:
    return FIXTURES / family / f"model.{kind}"


def config(family: str) -> Path:
    return FIXTURES / family / "config.yaml"


@functools.cache
def reference(family: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / family / "reference.safetensors"))


def write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return folder


def tokenizer():
    return LDMTokenizer({token: i for i, token in enumerate(VOCAB)})


def prompts(token_ids: torch.Tensor) -> list[str]:
    """The prompt whose BERT tokens are ``token_ids`` (one row per prompt) in :data:`VOCAB`."""
    return [" ".join(f"w{i}" for i in row.tolist() if i not in (0, 101, 102)) for row in token_ids]


@functools.cache
def load(family: str, use_ema=None, kind: str = "ckpt"):
    """The pipeline of a fixture (cached: callers must not change its components)."""
    pipe = DiffusionPipeline.from_single_file(checkpoint(family, kind), config=config(family), use_ema=use_ema,
                                              tokenizer=tokenizer() if family == "txt2img" else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the README's measure of a difference)."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def assert_rel(actual, expected, what: str, tol: float = TOLERANCE) -> float:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    return err


def expected_images(family: str, run: str) -> torch.Tensor:
    """The pipeline's output in [0, 1]: the inpainting composite, else clamp((decoded + 1) / 2)."""
    ref = reference(family)
    if family == "inpainting":
        return ref[f"{run}.inpainted"]
    return torch.clamp((ref[f"{run}.decoded"] + 1.0) / 2.0, 0.0, 1.0)


def call_pipeline(pipe, family: str, eta: float, **kwargs):
    """Run ``pipe`` on the fixture's inputs as the recorded run: x_T, 5 steps, seed 1234, guidance 3."""
    ref = reference(family)
    kwargs = {"num_inference_steps": 5, "eta": eta, "latents": ref["x_T"],
              "generator": torch.Generator().manual_seed(SEED), **kwargs}
    if family == "txt2img":
        return pipe(prompts(ref["cond.token_ids"]), guidance_scale=GUIDED[family], **kwargs)
    if family == "superres":
        return pipe(ref["cond.lr_image"], **kwargs)  # a tensor in [-1, 1], as diffusers
    if family == "uncond":
        return pipe(batch_size=ref["x_T"].shape[0], **kwargs)
    if family == "cin":
        return pipe(ref["cond.class_label"].tolist(), guidance_scale=GUIDED[family], **kwargs)
    return pipe(list(ref["input.image_uint8_hwc"].numpy()), list(ref["input.mask_uint8_hw"].numpy()), **kwargs)


def model_call(pipe, family: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``LatentDiffusion.apply_model(x, t, cond)`` of the recorded runs, with the recorded conditioning."""
    ref = reference(family)
    with torch.no_grad():
        if family == "txt2img":
            context = torch.cat([ref["uncond.bert_out"], ref["cond.bert_out"]])
            return pipe.unet(x, t, encoder_hidden_states=context).sample
        if family == "cin":
            context = torch.cat([ref["uncond.c"], ref["cond.c"]])
            return pipe.unet(x, t, encoder_hidden_states=context).sample
        if family in ("superres", "inpainting"):
            return pipe.unet(torch.cat([x, ref["cond.c"]], dim=1), t).sample
        return pipe.unet(x, t).sample
