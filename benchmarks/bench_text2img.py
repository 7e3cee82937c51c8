"""Full-size ldm-text2im-large-256 (random weights): ldmkit against diffusers in one process.

Run by hand (about 5 minutes on 2 cores, ~14 GB RAM):
    python benchmarks/bench_text2img.py [--steps 5] [--repeats 3] [--dtype fp32|bf16]
Prints and writes benchmarks/results/text2img-<dtype>.json: seconds per UNet step (median), LDMBert and
decoder seconds, end-to-end seconds for a short run, the peak RSS increase of each run, the ratios
(diffusers / ldmkit, > 1 means ldmkit is faster), and the max abs difference of the images.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` is the maximum above the start."""

    def __init__(self, interval=0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.base = self.rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def build_reference():
    """diffusers' pipeline with the published shapes (published-checkpoints.md) and random weights."""
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

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
    return unet.eval(), vae.eval(), bert.eval()


def to_ldmkit(unet, vae, bert):
    import ldmkit

    def convert(cls, model, config):
        return cls.from_state_dict(dict(config), model.state_dict())

    return (convert(ldmkit.UNet2DConditionModel, unet, unet.config),
            convert(ldmkit.AutoencoderKL, vae, vae.config),
            convert(ldmkit.LDMBertModel, bert, bert.config.to_dict()))


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def interleaved(fn_a, fn_b, repeats):
    """Median seconds of a and b, alternating a, b, a, b... so background load hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            if fn is fn_a:
                out_a = out
            else:
                out_b = out
    return statistics.median(ta), out_a, statistics.median(tb), out_b


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(torch.get_num_threads())

    d_unet, d_vae, d_bert = build_reference()
    o_unet, o_vae, o_bert = to_ldmkit(d_unet, d_vae, d_bert)
    for m in (d_unet, d_vae, d_bert, o_unet, o_vae, o_bert):
        m.to(dtype)

    results = {"dtype": args.dtype, "threads": torch.get_num_threads(), "steps": args.steps}
    x = torch.randn(2, 4, 32, 32, dtype=dtype)
    ids = torch.randint(0, 30522, (2, 77))
    with torch.no_grad():
        ctx = d_bert(ids)[0]
        for name, fn_d, fn_o in [
            ("unet_step_batch2", lambda: d_unet(x, 500, encoder_hidden_states=ctx).sample,
             lambda: o_unet(x, 500, encoder_hidden_states=ctx).sample),
            ("ldmbert_batch2", lambda: d_bert(ids)[0], lambda: o_bert(ids)[0]),
            ("kl_decode_32_to_256", lambda: d_vae.decode(x[:1]).sample, lambda: o_vae.decode(x[:1]).sample),
        ]:
            fn_d(), fn_o()  # warm-up
            td, out_d, to, out_o = interleaved(fn_d, fn_o, args.repeats)
            results[name] = {"diffusers_s": td, "ldmkit_s": to, "speedup": td / to,
                             "max_abs_diff": (out_d.float() - out_o.float()).abs().max().item()}
            print(name, json.dumps(results[name]))

    # End to end: same latents, same step noise, guidance 6, eta 0.3.
    import diffusers

    import ldmkit

    sched_cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    tok_dir = RESULTS / "_vocab"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                 + [f"w{i}" for i in range(30517)]) + "\n")
    from transformers import BertTokenizer

    d_pipe = diffusers.LDMTextToImagePipeline(vqvae=d_vae, bert=d_bert, unet=d_unet,
                                              tokenizer=BertTokenizer(str(tok_dir / "vocab.txt")),
                                              scheduler=diffusers.DDIMScheduler(**sched_cfg))
    o_pipe = ldmkit.LDMTextToImagePipeline(vqvae=o_vae, bert=o_bert, unet=o_unet,
                                           tokenizer=ldmkit.LDMTokenizer.from_pretrained(tok_dir),
                                           scheduler=ldmkit.DDIMScheduler(**sched_cfg))
    for p in (d_pipe, o_pipe):
        p.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    prompt = ["w1 w2 w3 w4"]
    kw = {"num_inference_steps": args.steps, "eta": 0.3, "guidance_scale": 6.0, "output_type": "np"}

    def run_diffusers():
        step = d_pipe.scheduler.step
        d_pipe.scheduler.step = functools.partial(step, generator=torch.Generator().manual_seed(1))
        try:
            return d_pipe(prompt, latents=latents.clone(), **kw).images
        finally:
            d_pipe.scheduler.step = step

    def run_ldmkit():
        return o_pipe(prompt, latents=latents.clone(), generator=torch.Generator().manual_seed(1), **kw).images

    e2e = {}
    for name, fn in (("diffusers", run_diffusers), ("ldmkit", run_ldmkit)):
        with PeakRSS() as mem:
            seconds, images = timed(fn, 1)
        e2e[name] = {"seconds": seconds, "peak_rss_increase_gib": mem.peak / 2**30, "images": images}
    results["end_to_end"] = {
        "diffusers_s": e2e["diffusers"]["seconds"], "ldmkit_s": e2e["ldmkit"]["seconds"],
        "speedup": e2e["diffusers"]["seconds"] / e2e["ldmkit"]["seconds"],
        "diffusers_peak_rss_increase_gib": e2e["diffusers"]["peak_rss_increase_gib"],
        "ldmkit_peak_rss_increase_gib": e2e["ldmkit"]["peak_rss_increase_gib"],
        "image_max_abs_diff": float(abs(e2e["diffusers"]["images"] - e2e["ldmkit"]["images"]).max()),
    }
    print("end_to_end", json.dumps(results["end_to_end"]))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"text2img-{args.dtype}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
