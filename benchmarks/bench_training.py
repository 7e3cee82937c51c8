"""Training throughput (images per second) of the recipes, fp32 against bf16 (autocast), on this machine.

Each case trains ``--warmup + --steps`` steps through the real trainer (data loading, optimizer, EMA
included; sampling, evaluation and checkpoints off) and reports the speed over the last ``--steps``. The
toy recipes are the shipped ones; "small" cases scale the same networks up to sizes where the
convolutions, not the Python overhead, dominate (64x64 images, 64-256 channels). Results go to
benchmarks/results/training.json.

    python benchmarks/bench_training.py                 # everything (~15 min on 2 cores)
    python benchmarks/bench_training.py --only ae-kl    # one case
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import announce, write_result

from ldmkit import AutoencoderKL, VQModel
from ldmkit.datasets.toy import make_toy_dataset
from ldmkit.training import build_recipe, train_autoencoder, train_ldm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "training.json"

# (name, kind, recipe file, overrides, first stage for LDMs)
CASES = [
    ("ae-kl-toy", "autoencoder", "toy-autoencoder.yaml", [], None),
    ("ae-vq-gan-toy", "autoencoder", "toy-vq-autoencoder.yaml", ["loss.disc_start=0"], None),
    ("ldm-text-toy", "ldm", "toy-text2img.yaml", ["data.latent_cache=false"], "kl8"),
    ("ldm-superres-toy", "ldm", "toy-superres.yaml", [], "vq4"),
    ("ldm-uncond-toy", "ldm", "toy-uncond.yaml", ["data.latent_cache=false"], "vq4"),
    ("ae-kl-small", "autoencoder", "toy-autoencoder.yaml",
     ["data.resolution=64", "model.block_out_channels=[64, 128, 256, 256]", "model.norm_num_groups=32",
      "model.mid_block_add_attention=true"], None),
    ("ldm-text-small", "ldm", "toy-text2img.yaml",
     ["data.resolution=64", "data.latent_cache=false", "unet.block_out_channels=[128, 256]",
      "unet.norm_num_groups=32", "unet.num_attention_heads=8", "text.d_model=256", "text.layers=4",
      "text.heads=4", "text.head_dim=64", "text.ffn_dim=1024"], "kl8"),
]
PRECISIONS = [("fp32", "no", False), ("fp32+channels_last", "no", True), ("bf16", "bf16", False),
              ("bf16+channels_last", "bf16", True)]


def first_stage(kind: str, folder: Path) -> Path:
    """A randomly initialised autoencoder of the toy recipes' shape (the LDM speed does not depend on it)."""
    torch.manual_seed(0)
    levels = 4 if kind == "kl8" else 3
    common = dict(block_out_channels=[32] * levels, down_block_types=["DownEncoderBlock2D"] * levels,
                  up_block_types=["UpDecoderBlock2D"] * levels, layers_per_block=1, norm_num_groups=8,
                  mid_block_add_attention=False)
    model = AutoencoderKL(latent_channels=4, **common) if kind == "kl8" else VQModel(latent_channels=3, **common)
    model.save_pretrained(folder / kind)
    return folder / kind


def measure(name, kind, recipe_file, overrides, stage, precision, channels_last, work: Path, steps, warmup):
    data = yaml.safe_load((ROOT / "recipes" / recipe_file).read_text())
    out = work / f"{name}-{precision}-{channels_last}"
    data.update(output_dir=str(out))
    data["data"]["root"] = str(work.parent / "toy")
    data["data"]["latent_cache_dir"] = str(work / "cache")
    if stage:
        data["autoencoder"] = str(first_stage(stage, work))
    train = [f"train.max_steps={warmup + steps}", f"train.log_every={warmup + steps}", "train.progress_bar=false",
             "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=100000",
             f"train.mixed_precision={precision}", f"train.channels_last={str(channels_last).lower()}",
             "train.warmup_steps=0"]
    recipe = build_recipe(kind, data, overrides + train)
    runner = train_autoencoder if kind == "autoencoder" else train_ldm
    timer = _StepTimer(warmup)
    timer.install()
    try:
        runner(recipe)
    finally:
        timer.uninstall()
    batch = recipe.train.batch_size
    return {"case": name, "precision": precision, "channels_last": channels_last,
            "resolution": recipe.data.resolution, "batch_size": batch, "steps_timed": steps,
            "images_per_s": round(batch * steps / timer.elapsed(), 2)}


class _StepTimer:
    """Times the optimizer steps after ``warmup`` by wrapping the trainer's step function."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.count = 0
        self.start = self.end = None

    def install(self):
        from ldmkit.training import trainer

        self._original = trainer._optimizer_step

        def step(*args, **kwargs):
            result = self._original(*args, **kwargs)
            self.count += 1
            if self.count == self.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()
            return result

        trainer._optimizer_step = step

    def uninstall(self):
        from ldmkit.training import trainer

        trainer._optimizer_step = self._original

    def elapsed(self) -> float:
        return self.end - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="case names (prefix match)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", nargs="*", default=[p[0] for p in PRECISIONS])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per case, interleaved across precisions; the best is kept (the CPU is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    busy = announce()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_toy_dataset(work / "toy", size=64, variants=4)  # resized to each recipe's resolution
        for repeat in range(args.repeats):
            (work / f"r{repeat}").mkdir()
        for name, kind, recipe_file, overrides, stage in CASES:
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            best: dict[str, dict] = {}
            for repeat in range(args.repeats):
                for label, precision, channels_last in PRECISIONS:
                    if label not in args.precisions:
                        continue
                    row = measure(name, kind, recipe_file, overrides, stage, precision, channels_last,
                                  work / f"r{repeat}", args.steps, args.warmup)
                    row["label"] = label
                    row["threads"] = args.threads
                    print(f"{name:18s} {label:20s} {row['images_per_s']:8.2f} images/s", flush=True)
                    if label not in best or row["images_per_s"] > best[label]["images_per_s"]:
                        best[label] = row
            results.extend(best.values())
    report = {"machine": _cpu_name(), "steps_timed": args.steps, "repeats": args.repeats,
              "torch": torch.__version__, "bf16_native": _bf16_native(), "results": results,
              "note": "2-core CPU shared with other jobs: every case runs --repeats times interleaved across "
                      "precisions and the best is kept; with 2 threads the sharing hurts most (OpenMP threads "
                      "waiting on each other)."}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if previous.get("results"):  # keep rows of earlier runs that this one did not measure
        measured = {(r["case"], r["label"], r["threads"]) for r in results}
        keep = [r for r in previous["results"] if (r["case"], r.get("label"), r.get("threads")) not in measured]
        report["results"] = keep + results
    write_result(RESULTS, report, busy)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_native() -> bool:
    from ldmkit.training.run import cpu_supports_bf16

    return cpu_supports_bf16()


if __name__ == "__main__":
    main()
