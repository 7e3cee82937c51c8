"""The bad-input battery of issue 15: the inputs a hostile but realistic user tries, across the Python API,
loading and the CLI, each run and classified (clear error, correct accept, traceback, silent garbage,
leftover temporary file, unbounded). Used by tests/test_bad_input_battery.py and
benchmarks/bad_inputs_battery.py (one case list for both)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .. import DiffusionPipeline, LDMKitError
from ..cli import main
from ..loading.weights import load_state_dict
from . import tiny_pipelines

UNBOUNDED_S = 30.0  # a case that takes longer than this counts as unbounded


@dataclass
class Case:
    name: str
    area: str  # "api", "loading" or "cli"
    run: Callable[[Path], object]  # gets an empty folder; returns a pipeline output, a pipeline, or a CLI result
    accept: bool = False  # the correct outcome is a valid result (else: a clear error)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t2i(**kw):
    return lambda _: tiny_pipelines.text2img()(**{"prompt": "red apple", "num_inference_steps": 1, **kw})


def _on(pipe: Callable, **kw):
    return lambda _: pipe()(**{"num_inference_steps": 1, **kw})


def _cli(*argv: str, setup: Callable[[Path], list[str]] | None = None):
    def run(folder: Path):
        extra = setup(folder) if setup else []
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main([*argv, *extra, "-o", str(folder / "out"), "--quiet"] if argv[0] != "info"
                            else [*argv, *extra])
            except SystemExit as e:
                code = e.code
        return {"code": code, "stderr": [ln for ln in stderr.getvalue().splitlines() if ln.strip()],
                "folder": folder / "out"}
    return run


def _file(name: str, data: bytes):
    def setup(folder: Path) -> list[str]:
        (folder / name).write_bytes(data)
        return [str(folder / name)]
    return setup


def _plain_png(folder: Path) -> list[str]:
    PIL.Image.new("RGB", (8, 8), "red").save(folder / "plain.png")
    return ["--from-png", str(folder / "plain.png")]


def _out_is_file(folder: Path) -> list[str]:
    (folder / "out").write_text("x")
    return []


def _weights(data: bytes):
    def run(folder: Path):
        (folder / "model.safetensors").write_bytes(data)
        return load_state_dict(folder / "model.safetensors")
    return run


def _text2img_errors() -> dict:
    return {
        "generator=42": _t2i(generator=42), "generator='x'": _t2i(generator="x"), "generator=[]": _t2i(generator=[]),
        "two generators for one image": _t2i(generator=[_g(), _g(1)]), "generator=1.5": _t2i(generator=1.5),
        **{f"height={v!r}": _t2i(height=v) for v in ("32", 32.0, 0, -32, 33, 100000, True)},
        "height=width=100000": _t2i(height=100000, width=100000),
        **{f"guidance_scale={v!r}": _t2i(guidance_scale=v) for v in (math.nan, math.inf, -1, "3", None)},
        **{f"eta={v!r}": _t2i(eta=v) for v in (math.nan, -0.1, math.inf, "0")},
        **{f"num_inference_steps={v!r}": _t2i(num_inference_steps=v) for v in (0, -1, 1.5, "2", None, True)},
        **{f"output_type={v!r}": _t2i(output_type=v) for v in ("PIL", "jpg", None, 3)},
        **{f"prompt={v!r}": _t2i(prompt=v) for v in (None, 3, [], [1, 2], "", "   ", b"x")},
        "negative_prompt=3": _t2i(negative_prompt=3), "2 negatives for 1 prompt": _t2i(negative_prompt=["a", "b"]),
        **{f"num_images_per_prompt={v!r}": _t2i(num_images_per_prompt=v) for v in (0, -1, 1.5, True)},
        "latents of the wrong shape": _t2i(latents=torch.randn(1, 4, 3, 3)),
        "NaN latents": _t2i(latents=torch.full((1, 4, 8, 8), math.nan)),
        "integer latents": _t2i(latents=torch.zeros(1, 4, 8, 8, dtype=torch.long)), "list latents": _t2i(latents=[0.0]),
        "max_batch_size=0": _t2i(max_batch_size=0), "max_batch_size='2'": _t2i(max_batch_size="2"),
        "unknown keyword guidance=": _t2i(guidance=3.0), "callback 'x'": _t2i(callback_on_step_end="x"),
        "prompt_embeds of the wrong shape": _t2i(prompt=None, prompt_embeds=torch.zeros(1, 77, 3)),
        "prompt and prompt_embeds": _t2i(prompt_embeds=torch.zeros(1, 77, 128)),
        "guidance_interval=(3, 1)": _t2i(guidance_interval=(3, 1), guidance_scale=3.0),
    }


def _other_errors() -> dict:
    return {
        **{f"uncond batch_size={v!r}": _on(tiny_pipelines.uncond, batch_size=v) for v in (0, "2", True, -1)},
        "uncond NaN latents": _on(tiny_pipelines.uncond, latents=torch.full((1, 3, 8, 8), math.nan)),
        **{f"class_labels={v!r}": _on(tiny_pipelines.class_conditional, class_labels=v)
           for v in (-1, 11, "cat", 1.5, [], [[1]])},
        "superres image=None": _on(tiny_pipelines.superres, image=None),
        "superres image='file.png'": _on(tiny_pipelines.superres, image="file.png"),
        "superres float 0-255 tensor": _on(tiny_pipelines.superres, image=torch.rand(1, 3, 8, 8) * 255),
        "superres int64 tensor": _on(tiny_pipelines.superres, image=torch.randint(0, 255, (1, 3, 8, 8))),
        "superres uint16 array": _on(tiny_pipelines.superres, image=np.zeros((8, 8, 3), np.uint16)),
        "superres 0x0 image": _on(tiny_pipelines.superres, image=PIL.Image.new("RGB", (0, 0))),
        "superres NaN array": _on(tiny_pipelines.superres, image=np.full((8, 8, 3), np.nan)),
        "superres tile_size=7": _on(tiny_pipelines.superres, image=PIL.Image.new("RGB", (8, 8)), tile_size=7),
        "superres tile_overlap=-1": _on(tiny_pipelines.superres, image=PIL.Image.new("RGB", (8, 8)), tile_overlap=-1),
        "superres 3 generators for 1": _on(tiny_pipelines.superres, image=PIL.Image.new("RGB", (8, 8)),
                                           generator=[_g(), _g(), _g()]),
        "inpaint mask of another size": _on(tiny_pipelines.inpaint, image=PIL.Image.new("RGB", (16, 16)),
                                            mask_image=PIL.Image.new("L", (8, 8))),
        "inpaint NaN mask": _on(tiny_pipelines.inpaint, image=PIL.Image.new("RGB", (16, 16)),
                                mask_image=np.full((16, 16), np.nan, np.float32)),
        "inpaint 18x18 image": _on(tiny_pipelines.inpaint, image=PIL.Image.new("RGB", (18, 18)),
                                   mask_image=PIL.Image.new("L", (18, 18))),
    }


def _accepts() -> dict:
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    return {
        "eta=2.0 (warns)": _t2i(eta=2.0), "a 10000-character prompt": _t2i(prompt="a" * 10000),
        "an emoji prompt": _t2i(prompt="😀" * 100),
        "10 prompts, max_batch_size=3": _t2i(prompt=["red apple"] * 10, max_batch_size=3),
        "superres I;16 image": _on(tiny_pipelines.superres, image=PIL.Image.fromarray(ramp)),
        "superres F image": _on(tiny_pipelines.superres, image=PIL.Image.fromarray(ramp.astype(np.float32) / 63000)),
        "inpaint 3 images, 1 mask, max_batch_size=2": _on(
            tiny_pipelines.inpaint, image=[PIL.Image.new("RGB", (16, 16), "red")] * 3,
            mask_image=PIL.Image.new("L", (16, 16), 255), max_batch_size=2),
    }


def _loading() -> dict:
    return {
        "from_pretrained of a missing folder": lambda f: DiffusionPipeline.from_pretrained(str(f / "nope")),
        "torch_dtype=torch.int8": lambda f: DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img",
                                                                              torch_dtype=torch.int8),
        "torch_dtype='float99'": lambda f: DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img",
                                                                             torch_dtype="float99"),
        "a folder without model_index.json": lambda f: DiffusionPipeline.from_pretrained(str(f)),
        "a git-lfs pointer as weights": _weights(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"),
        "an HTML page as weights": _weights(b"<!DOCTYPE html><html></html>"),
        "random bytes as weights": _weights(bytes(range(256)) * 4),
    }


PNG = ("txt2img", "--steps", "1")


def _cli_errors() -> dict:
    png = PNG
    return {
        "txt2img ''": _cli("txt2img", "", "--steps", "1"), "--steps 0": _cli("txt2img", "x", "--steps", "0"),
        "--guidance nan": _cli(*png, "x", "--guidance", "nan"), "--eta nan": _cli(*png, "x", "--eta", "nan"),
        "--seed 2**70": _cli(*png, "x", "--seed", "1180591620717411303424"),
        "--height 33": _cli(*png, "x", "--height", "33"), "--n 0": _cli(*png, "x", "--n", "0"),
        "--scheduler nope": _cli(*png, "x", "--scheduler", "nope"), "--bogus": _cli(*png, "x", "--bogus"),
        "--steps x": _cli("txt2img", "x", "--steps", "x"), "--model /nonexistent": _cli(*png, "x", "--model", "/no"),
        "-o an existing file": _cli(*png, "x", setup=_out_is_file),
        "--from-png of a plain PNG": _cli(*png, setup=_plain_png),
        "--from-png of a missing file": _cli(*png, "--from-png", "/no/such.png"),
        "upscale a missing file": _cli("upscale", "/no/such.png", "--steps", "1"),
        "upscale a text file": _cli("upscale", "--steps", "1", setup=_file("notes.png", b"hello")),
        "info of a missing folder": _cli("info", "/no/such/folder"),
    }


def cases() -> list[Case]:
    """The battery: 112 cases (104 to refuse, 8 to accept)."""
    return ([Case(k, "api", v) for k, v in {**_text2img_errors(), **_other_errors()}.items()]
            + [Case(k, "api", v, accept=True) for k, v in _accepts().items()]
            + [Case(k, "loading", v) for k, v in _loading().items()]
            + [Case(k, "cli", v) for k, v in _cli_errors().items()]
            + [Case("txt2img 'red apple' --steps 1", "cli", _cli(*PNG, "red apple"), accept=True)])


def _garbage(arrays) -> bool:
    """NaN / inf anywhere, or an image that is one constant value."""
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all() or a.std() == 0:
            return True
    return False


def _outcome(result) -> str:
    if isinstance(result, dict) and "code" in result:  # the CLI
        if result["code"] == 2 and len(result["stderr"]) == 1:
            return "clear error"
        if result["code"] != 0:
            return "traceback"
        pngs = sorted(result["folder"].glob("*.png"))
        return "silent garbage" if not pngs or _garbage(np.asarray(PIL.Image.open(p)) for p in pngs) else "accept"
    images = getattr(result, "images", None)
    if images is None:
        return "accept"  # a loaded pipeline or state dict
    arrays = [np.asarray(im) for im in images] if isinstance(images, list) else \
        [np.asarray(images.float().cpu() if isinstance(images, torch.Tensor) else images)]
    return "silent garbage" if _garbage(arrays) else "accept"


def run_case(case: Case) -> dict:
    """Run one case in a fresh folder; ``outcome`` and whether it was the correct one, leftovers, seconds."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = Path(tmp)
        start, case_error = time.perf_counter(), None
        try:
            outcome = _outcome(case.run(folder))
        except LDMKitError as e:
            outcome = "clear error" if str(e).strip() else "traceback"
        except Exception as e:  # noqa: BLE001 - what the battery counts
            outcome, case_error = "traceback", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        leftovers = [str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.name.startswith(".") or p.name.endswith(".tmp")]
    if seconds > UNBOUNDED_S:
        outcome = "unbounded"
    correct = outcome == ("accept" if case.accept else "clear error")
    return {"name": case.name, "area": case.area, "outcome": outcome, "correct": correct,
            "leftovers": leftovers, "seconds": round(seconds, 3), **({"error": case_error} if case_error else {})}


def run_battery(selected: list[Case] | None = None) -> dict:
    """Every case run; the counts of issue 15 and the per-case results."""
    results = [run_case(c) for c in (selected or cases())]
    count = {o: sum(r["outcome"] == o for r in results) for o in
             ("clear error", "accept", "traceback", "silent garbage", "unbounded")}
    return {"tried": len(results), "clear errors": count["clear error"],
            "correct accepts": sum(r["outcome"] == "accept" and r["correct"] for r in results),
            "tracebacks": count["traceback"], "silent garbage": count["silent garbage"],
            "leftover files": sum(len(r["leftovers"]) for r in results), "unbounded": count["unbounded"],
            "wrong outcome": [r["name"] for r in results if not r["correct"]], "cases": results}
