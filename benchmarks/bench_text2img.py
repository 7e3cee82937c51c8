"""Full-size ldm-text2im-large-256 (random weights): ldmkit against diffusers, each from the same saved folder.

Run by hand on a quiet machine (benchmarks/quiet_run.sh runs it with the issue 12 settings):
    python benchmarks/bench_text2img.py [--modes fp32 bf16 fast] [--steps 2] [--repeats 3] [--rounds 2]
                                        [--headline-rounds 1] [--no-headline | --headline-only] [--tiny]
The folder (published shapes, random weights, the published DDIM config) is built once with diffusers'
classes and saved with its save_pretrained (``--folder``, default /tmp/ldmkit-bench/ldm-text2im-large-256).
Every measurement runs in a fresh one-thread process that loads the folder with its library's own
``from_pretrained`` under ``torch.inference_mode()``; the processes alternate between the libraries,
``--rounds`` times, and the medians are compared.

Modes: ``fp32`` (exact; both libraries), ``compiled`` (ldmkit fp32 after ``pipe.compile(("unet",))``; the compile
time, the first UNet call, is reported as ``compile_s`` and not in the step time), ``bf16``
(``torch_dtype=torch.bfloat16``; both libraries, diffusers' output as ``output_type="pt"`` then ``.float()``) and
``fast`` (ldmkit only: the dtype of the fast preset, then ``ldmkit.pipelines.presets.apply_preset(pipe, "fast")``: its
sampler, feature cache and guidance interval).
Per mode: load seconds and peak RSS, seconds per UNet step (batch 2, as with guidance), LDMBert
(batch 2), the KL decode (32 -> 256), and a pipeline call (``--steps`` steps, guidance 6; DDIM with eta 0.3
and the same x_T and step noise in fp32 / bf16, where the largest pixel difference between the libraries is
reported too). Ratios are diffusers fp32 / ldmkit in that mode (> 1: ldmkit is faster), and for bf16 also
diffusers bf16 / ldmkit bf16.

Headline: the whole process (interpreter start, imports, load, one image; each in a fresh process) of
``ldmkit txt2img --fast`` (the command line itself, writing its PNG), against diffusers' seed call (fp32, 50 DDIM
steps, guidance 6, eta 0.3), ``--headline-rounds`` times each, alternating, with each process's peak RSS.
ldmkit's CLI keeps the weights it converts to bf16 on disk (``ldmkit.loading.converted``): one ldmkit run
before the rounds, with an empty cache, converts and writes them and is reported apart (``ldmkit_first_run``).

Results: benchmarks/results/text2img-modes.json and text2img-headline.json, written only when no other
process used the CPU (the load average and the busy share are printed first). ``--tiny`` runs the same code
on a small layout in a few seconds and writes nothing (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS, announce, peak_rss_of_process, run_worker, timed, worker_env, write_result

SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1}
PROMPT = ["w1 w2 w3 w4"]
VOCAB = 30522
LIBS = {"fp32": ("diffusers", "ldmkit"), "bf16": ("diffusers", "ldmkit"), "fast": ("ldmkit",),
        "compiled": ("ldmkit",)}
SEED_CALL = {"num_inference_steps": 50, "guidance_scale": 6.0, "eta": 0.3}  # the seed's snippet
# Published shapes (published-checkpoints.md); "tiny" keeps the structure at a few MB for --tiny.
LAYOUTS = {
    "full": {"unet": {"block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 1280, "sample_size": 32},
             "vae": {"block_out_channels": (128, 256, 512, 512)},
             "bert": {"encoder_layers": 32, "d_model": 1280, "encoder_attention_heads": 8, "head_dim": 64,
                      "encoder_ffn_dim": 5120}},
    "tiny": {"unet": {"block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32, "norm_num_groups": 8,
                      "sample_size": 8},
             "vae": {"block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8},
             "bert": {"encoder_layers": 2, "d_model": 32, "encoder_attention_heads": 2, "head_dim": 16,
                      "encoder_ffn_dim": 64}},
}


def build_folder(folder: Path, layout: str) -> Path:
    """The layout's shapes with random weights, saved by diffusers, in a child process: on Linux a child's
    peak RSS (``wait4``) starts at its parent's high-water mark, which building the full-size model in this
    process would raise to ~6 GiB for every measured child after it."""
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, __file__, "--build", layout, str(folder)], env=worker_env(), check=True)
    return folder


def _build(folder: Path, layout: str) -> None:
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    shapes = LAYOUTS[layout]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, flip_sin_to_cos=True,
        freq_shift=0, **shapes["unet"])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **shapes["vae"])
    bert = LDMBertModel(LDMBertConfig(vocab_size=VOCAB, max_position_embeddings=77, **shapes["bert"]))
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                   + [f"w{i}" for i in range(VOCAB - 5)]) + "\n")
        pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, unet=unet, tokenizer=BertTokenizer(str(vocab)),
                                                scheduler=diffusers.DDIMScheduler(**SCHEDULER))
        pipe.save_pretrained(folder)


def load(lib_name: str, mode: str, folder: str):
    """(pipeline, the __call__ keywords of the mode): loaded by the library's own from_pretrained."""
    import importlib

    lib = importlib.import_module(lib_name)
    if mode != "fast":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "compiled": torch.float32}[mode]
        pipe = lib.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if mode == "compiled":
            pipe.compile(("unet",))  # exact fp32 with the compiled UNet; the first step below compiles
        return pipe, {"eta": 0.3}
    from ldmkit.pipelines.presets import apply_preset, get_preset, pick_dtype

    dtype = pick_dtype(get_preset("fast").dtype, torch.device("cpu"))
    pipe = lib.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, apply_preset(pipe, "fast")


def worker(lib_name: str, mode: str, folder: str, steps: int, repeats: int, image_out: str) -> dict:
    torch.set_num_threads(1)
    with PeakRSS() as load_mem:
        start = time.perf_counter()
        pipe, call_kw = load(lib_name, mode, folder)
        load_s = time.perf_counter() - start
    dtype, size = pipe.unet.dtype, pipe.unet.config.sample_size  # latents 32 x 32 in the full layout
    result = {"load_s": load_s, "load_peak_rss_gib": load_mem.peak / 2**30}
    x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.randint(0, VOCAB, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ctx = pipe.bert(ids)[0]
        # x and t as the pipelines pass them (inference tensors, t 0-d), so a compiled UNet is not recompiled
        x, t = x.clone(), torch.tensor(500)
        for name, fn in (("unet_step_batch2_s", lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample),
                         ("ldmbert_batch2_s", lambda: pipe.bert(ids)[0]),
                         ("kl_decode_s", lambda: pipe.vqvae.decode(x[:1]).sample)):
            start = time.perf_counter()
            fn()  # warm-up (mode "compiled": the UNet's compile)
            if mode == "compiled" and name.startswith("unet"):
                result["compile_s"] = time.perf_counter() - start
            result[name] = timed(fn, repeats)[0]
        with PeakRSS() as call_mem:
            result["pipeline_call_s"], images = timed(lambda: call(pipe, lib_name, dtype, steps, call_kw), 1)
    result["pipeline_peak_rss_gib"] = call_mem.peak / 2**30
    result["dtype"] = str(dtype).removeprefix("torch.")
    torch.save(images.float(), image_out)
    return result


def call(pipe, lib_name: str, dtype, steps: int, call_kw: dict) -> torch.Tensor:
    """One call, ``steps`` steps, guidance 6, the same x_T (and step noise) in both libraries, as a tensor."""
    import functools

    size = pipe.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    kw = {**call_kw, "num_inference_steps": steps, "guidance_scale": 6.0, "output_type": "pt"}
    if lib_name == "ldmkit":
        return pipe(PROMPT, latents=latents, generator=torch.Generator().manual_seed(1), **kw).images
    # diffusers' LDM pipeline never hands the generator to scheduler.step (known-gaps.md): do it for it.
    step = pipe.scheduler.step
    pipe.scheduler.step = functools.partial(step, generator=torch.Generator().manual_seed(1))
    try:
        return pipe(PROMPT, latents=latents, **kw).images  # output_type="pt": no numpy of a bf16 tensor
    finally:
        pipe.scheduler.step = step


def compare(folder: Path, args) -> dict:
    """Every mode's medians over the rounds, and the ratios."""
    specs = [(lib, mode) for mode in args.modes for lib in LIBS[mode]]
    samples: dict[tuple[str, str], dict[str, list]] = {spec: {} for spec in specs}
    with tempfile.TemporaryDirectory() as tmp:
        images = {spec: str(Path(tmp) / f"{spec[0]}-{spec[1]}.pt") for spec in specs}
        for _ in range(args.rounds):
            for lib, mode in specs:
                out = run_worker(__file__, [lib, mode, str(folder), str(args.steps), str(args.repeats),
                                            images[lib, mode]])
                for key, value in out.items():
                    samples[lib, mode].setdefault(key, []).append(value)
        diffs = {mode: (torch.load(images["diffusers", mode]) - torch.load(images["ldmkit", mode])).abs().max().item()
                 for mode in args.modes if len(LIBS[mode]) == 2}
    medians = {f"{lib} {mode}": {k: statistics.median(v) if k != "dtype" else v[0] for k, v in values.items()}
               for (lib, mode), values in samples.items()}
    ratios = {}
    for mode in args.modes:
        ratios[f"diffusers fp32 / ldmkit {mode}"] = _ratios(medians.get("diffusers fp32"), medians[f"ldmkit {mode}"])
        if mode == "bf16":
            ratios["diffusers bf16 / ldmkit bf16"] = _ratios(medians["diffusers bf16"], medians["ldmkit bf16"])
    _print_table(medians, ratios, diffs)
    return {"steps": args.steps, "repeats": args.repeats, "rounds": args.rounds, "threads": 1, "medians": medians,
            "ratios": ratios, "pixels_max_abs_diff": diffs}


def _ratios(base: dict | None, ours: dict) -> dict:
    return {k: base[k] / ours[k] for k in ours if k.endswith("_s") and k in base} if base else {}


def _print_table(medians: dict, ratios: dict, diffs: dict) -> None:
    for name, values in medians.items():
        print(f"{name:16s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in values.items()))
    for name, values in ratios.items():
        print(f"{name:32s} " + "  ".join(f"{k.removesuffix('_s')} {v:.2f}x" for k, v in values.items()))
    for mode, diff in diffs.items():
        print(f"{mode} pixels max abs diff diffusers vs ldmkit {diff:.2e}")


# diffusers' seed call, as a script; ldmkit's side is its command line itself (``ldmkit txt2img --fast``), so the
# headline is what a user of the terminal waits for: interpreter start, imports, loading, the image, the PNG.
DIFFUSERS_HEADLINE = """
import json, sys, time
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
start = time.perf_counter()
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
loaded = time.perf_counter()
kw = dict(num_inference_steps=50, guidance_scale=6.0, eta=0.3)
image = pipe(["w1 w2 w3 w4"], generator=torch.Generator().manual_seed(0), **kw).images[0]
print(json.dumps({"load_s": loaded - start, "call_s": time.perf_counter() - loaded, "dtype": str(pipe.unet.dtype),
                  "steps": kw["num_inference_steps"], "image_size": list(image.size)}))
"""


def _headline_command(lib: str, folder: Path, out: Path) -> list[str]:
    if lib == "diffusers":
        return [sys.executable, "-c", DIFFUSERS_HEADLINE, str(folder)]
    return [sys.executable, "-m", "ldmkit", "txt2img", PROMPT[0], "--model", str(folder), "--fast", "--seed", "0",
            "--guidance", "6", "--quiet", "--force", "-o", str(out)]


def _headline_report(lib: str, out: str) -> dict:
    if lib == "diffusers":
        return json.loads(out.strip().splitlines()[-1])
    import PIL.Image

    from ldmkit.cli import read_png_metadata  # the PNG ldmkit wrote records how it was made

    path = out.strip().splitlines()[-1]
    meta = read_png_metadata(path)
    with PIL.Image.open(path) as im:
        size = list(im.size)
    return {"dtype": str(meta["dtype"]), "steps": meta["steps"], "image_size": size, "command": "ldmkit txt2img --fast"}


def _headline_process(lib: str, folder: Path, out: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(_headline_command(lib, folder, out), env=worker_env(env), stdout=subprocess.PIPE,
                            text=True)
    stdout, peak = peak_rss_of_process(proc)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the {lib} headline process failed ({proc.returncode})")
    return {**_headline_report(lib, stdout), "process_s": wall, "peak_rss_gib": peak / 2**30}


def headline(folder: Path, rounds: int) -> dict:
    """Whole-process seconds (measured from outside) and peak RSS to one image: ``ldmkit txt2img --fast``
    against diffusers' seed call (fp32, 50 DDIM steps, guidance 6, eta 0.3).

    The CLI keeps the weights it converts to bf16 (``ldmkit.loading.converted``), in an empty cache folder
    here: its first run converts and writes them (``first_run``, reported apart), the timed rounds map them."""
    runs: dict[str, list[dict]] = {"diffusers": [], "ldmkit": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"LDMKIT_CONVERTED_CACHE": str(Path(tmp) / "converted")}
        first = _headline_process("ldmkit", folder, Path(tmp), env)
        for _ in range(rounds):
            for lib in runs:
                runs[lib].append(_headline_process(lib, folder, Path(tmp), env))
    med = {lib: {k: statistics.median(r[k] for r in rs) for k in ("process_s", "load_s", "call_s", "peak_rss_gib")
                 if k in rs[0]} | {"dtype": rs[0]["dtype"], "steps": rs[0]["steps"]} for lib, rs in runs.items()}
    result = {"rounds": rounds, "threads": 1, "medians": med, "runs": runs, "ldmkit_first_run": first,
              "speedup_whole_process": med["diffusers"]["process_s"] / med["ldmkit"]["process_s"],
              "peak_rss_ldmkit_over_diffusers": med["ldmkit"]["peak_rss_gib"] / med["diffusers"]["peak_rss_gib"]}
    for lib, m in med.items():
        split = f" (load {m['load_s']:.2f}, call {m['call_s']:.2f})" if "load_s" in m else ""
        print(f"headline {lib:9s} {m['dtype']} {m['steps']} steps: process {m['process_s']:.2f} s{split}, "
              f"peak RSS {m['peak_rss_gib']:.2f} GiB")
    print(f"headline ldmkit first run (converts to bf16 and caches it): process {first['process_s']:.2f} s, "
          f"peak RSS {first['peak_rss_gib']:.2f} GiB")
    print(f"headline: diffusers' seed call / ldmkit txt2img --fast, whole process: "
          f"{result['speedup_whole_process']:.2f}x; peak RSS ldmkit / diffusers "
          f"{result['peak_rss_ldmkit_over_diffusers']:.2f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=sorted(LIBS), default=["fp32", "bf16", "fast", "compiled"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--headline-rounds", type=int, default=1)
    parser.add_argument("--no-headline", action="store_true")
    parser.add_argument("--headline-only", action="store_true", help="the headline alone (text2img-modes.json kept)")
    parser.add_argument("--tiny", action="store_true", help="a small layout, nothing written (a smoke test)")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--worker", nargs=6, metavar=("LIB", "MODE", "FOLDER", "STEPS", "REPEATS", "IMAGE_OUT"))
    parser.add_argument("--build", nargs=2, metavar=("LAYOUT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return _build(Path(args.build[1]), args.build[0])
    if args.worker:
        lib, mode, folder, steps, repeats, image_out = args.worker
        print(json.dumps(worker(lib, mode, folder, int(steps), int(repeats), image_out)))
        return
    layout = "tiny" if args.tiny else "full"
    folder = build_folder(args.folder or Path(f"/tmp/ldmkit-bench/ldm-text2im-{'tiny' if args.tiny else 'large-256'}"),
                          layout)
    busy = announce()
    modes = None if args.headline_only else compare(folder, args)
    top = None if args.no_headline else headline(folder, args.headline_rounds)
    if args.tiny:
        print("--tiny: a smoke run, no results written")
        return
    if modes is not None:
        write_result("text2img-modes", {"layout": "ldm-text2im-large-256 (random weights)", **modes}, busy)
    if top is not None:
        write_result("text2img-headline", {"layout": "ldm-text2im-large-256 (random weights)", **top}, busy)


if __name__ == "__main__":
    main()
