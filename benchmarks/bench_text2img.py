"""Full-size ldm-text2im-large-256 (random weights): ldmkit against diffusers, each from the same saved folder.

Run by hand on a quiet machine (fp32 and bf16: about 15 minutes on 2 cores, ~8 GB RAM, ~6 GB of disk):
    python benchmarks/bench_text2img.py [--dtype fp32 bf16] [--steps 2] [--repeats 3] [--rounds 2]
The folder (published shapes, random weights, the published DDIM config) is built once with diffusers'
classes and saved with its save_pretrained (``--folder``, default /tmp/ldmkit-bench/ldm-text2im-large-256).
Each measurement runs in a fresh one-thread process that loads the folder with its library's own
``from_pretrained(folder, torch_dtype=...)`` under ``torch.inference_mode()``; the processes alternate
between the libraries, ``--rounds`` times, and the medians are compared. Measured: load seconds and peak RSS,
seconds per UNet step (batch 2, as with guidance), LDMBert (batch 2), the KL decode 32 -> 256, a pipeline
call (``--steps`` DDIM steps, guidance 6, eta 0.3, same x_T and step noise; diffusers' output as
``output_type="pt"`` then ``.float()``, which also works in bf16) with its peak RSS, and the largest pixel
difference between the two libraries. Results: benchmarks/results/text2img-<dtype>.json (ratios are
diffusers / ldmkit: > 1 means ldmkit is faster), written only when no other process used the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS, cpu_busy_fraction, run_worker, timed, write_result

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1}
PROMPT = ["w1 w2 w3 w4"]


def build_folder(folder: Path) -> Path:
    """The published shapes (published-checkpoints.md) with random weights, saved by diffusers."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1280,
        attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    bert = LDMBertModel(LDMBertConfig(vocab_size=30522, max_position_embeddings=77, encoder_layers=32,
                                      d_model=1280, encoder_attention_heads=8, head_dim=64, encoder_ffn_dim=5120))
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                   + [f"w{i}" for i in range(30517)]) + "\n")
        pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, unet=unet, tokenizer=BertTokenizer(str(vocab)),
                                                scheduler=diffusers.DDIMScheduler(**SCHEDULER))
        pipe.save_pretrained(folder)
    return folder


def worker(lib_name: str, dtype_name: str, folder: str, steps: int, repeats: int, image_out: str) -> dict:
    import importlib

    torch.set_num_threads(1)
    lib, dtype = importlib.import_module(lib_name), DTYPES[dtype_name]
    with PeakRSS() as load_mem:
        start = time.perf_counter()
        pipe = lib.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
        load_s = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    result = {"load_s": load_s, "load_peak_rss_gib": load_mem.peak / 2**30}
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = torch.randint(0, 30522, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ctx = pipe.bert(ids)[0]
        for name, fn in (("unet_step_batch2_s", lambda: pipe.unet(x, 500, encoder_hidden_states=ctx).sample),
                         ("ldmbert_batch2_s", lambda: pipe.bert(ids)[0]),
                         ("kl_decode_32_to_256_s", lambda: pipe.vqvae.decode(x[:1]).sample)):
            fn()  # warm-up
            result[name] = timed(fn, repeats)[0]
        with PeakRSS() as call_mem:
            result["pipeline_call_s"], images = timed(lambda: _call(pipe, lib_name, steps, dtype), 1)
    result["pipeline_peak_rss_gib"] = call_mem.peak / 2**30
    torch.save(images.float(), image_out)
    return result


def _call(pipe, lib_name: str, steps: int, dtype) -> torch.Tensor:
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    kw = {"num_inference_steps": steps, "eta": 0.3, "guidance_scale": 6.0, "output_type": "pt"}
    if lib_name == "ldmkit":
        return pipe(PROMPT, latents=latents, generator=torch.Generator().manual_seed(1), **kw).images
    # diffusers' LDM pipeline never hands the generator to scheduler.step (known-gaps.md): do it for it.
    step = pipe.scheduler.step
    pipe.scheduler.step = functools.partial(step, generator=torch.Generator().manual_seed(1))
    try:
        return pipe(PROMPT, latents=latents, **kw).images
    finally:
        pipe.scheduler.step = step


def compare(dtype_name: str, folder: Path, args) -> dict:
    samples: dict[str, dict[str, list[float]]] = {"diffusers": {}, "ldmkit": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = {lib: str(Path(tmp) / f"{lib}.pt") for lib in samples}
        for _ in range(args.rounds):
            for lib in samples:
                out = run_worker(__file__, [lib, dtype_name, str(folder), str(args.steps), str(args.repeats),
                                            images[lib]])
                for key, value in out.items():
                    samples[lib].setdefault(key, []).append(value)
        diff = (torch.load(images["diffusers"]) - torch.load(images["ldmkit"])).abs().max().item()
    medians = {lib: {k: statistics.median(v) for k, v in values.items()} for lib, values in samples.items()}
    ratios = {k: medians["diffusers"][k] / medians["ldmkit"][k] for k in medians["ldmkit"] if k.endswith("_s")}
    for key in medians["ldmkit"]:
        print(f"{dtype_name} {key:26s} diffusers {medians['diffusers'][key]:8.3f}  ldmkit {medians['ldmkit'][key]:8.3f}"
              + (f"  diffusers/ldmkit {ratios[key]:5.2f}x" if key in ratios else ""))
    print(f"{dtype_name} pixels max abs diff {diff:.2e}")
    return {"dtype": dtype_name, "steps": args.steps, "repeats": args.repeats, "rounds": args.rounds, "threads": 1,
            "medians": medians, "diffusers_over_ldmkit": ratios, "pixels_max_abs_diff": diff}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ldmkit-bench/ldm-text2im-large-256"))
    parser.add_argument("--worker", nargs=6, metavar=("LIB", "DTYPE", "FOLDER", "STEPS", "REPEATS", "IMAGE_OUT"))
    args = parser.parse_args()
    if args.worker:
        lib, dtype, folder, steps, repeats, image_out = args.worker
        print(json.dumps(worker(lib, dtype, folder, int(steps), int(repeats), image_out)))
        return
    folder = build_folder(args.folder)
    for dtype_name in args.dtype:
        busy = cpu_busy_fraction()
        print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}, CPU busy {busy:.0%}")
        write_result(f"text2img-{dtype_name}", compare(dtype_name, folder, args), busy)


if __name__ == "__main__":
    main()
