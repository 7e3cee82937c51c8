"""Helpers for the training tests: toy data, tiny models and recipes small enough for a 2-core CI machine."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldmkit import AutoencoderKL, VQModel
from ldmkit.datasets.toy import make_toy_dataset
from ldmkit.training.recipe import build_recipe

TRAIN_FAST = {"progress_bar": False, "log_every": 1, "checkpoint_every": 1000, "sample_every": 0,
              "eval_every": 0}


def toy_data(folder: Path, size: int = 16, variants: int = 1) -> Path:
    return make_toy_dataset(folder, size=size, variants=variants)


def tiny_autoencoder(folder: Path, kind: str = "kl", levels: int = 3, seed: int = 0) -> Path:
    """A randomly initialised autoencoder saved with save_pretrained (factor 2 ** (levels - 1))."""
    torch.manual_seed(seed)
    common = dict(block_out_channels=[8] * levels, down_block_types=["DownEncoderBlock2D"] * levels,
                  up_block_types=["UpDecoderBlock2D"] * levels, layers_per_block=1, norm_num_groups=4,
                  mid_block_add_attention=False)
    model = (AutoencoderKL(latent_channels=4, **common) if kind == "kl"
             else VQModel(latent_channels=3, num_vq_embeddings=16, **common))
    model.save_pretrained(folder)
    return folder


def ldm_dict(data_root: Path, autoencoder: Path, output_dir: Path, conditioning: str = "text", **train) -> dict:
    return {
        "conditioning": conditioning, "autoencoder": str(autoencoder), "output_dir": str(output_dir), "seed": 0,
        "data": {"root": str(data_root), "resolution": 16, "random_crop": False, "random_flip": True,
                 "num_workers": 0},
        "unet": {"block_out_channels": [16, 16], "layers_per_block": 1, "num_attention_heads": 2,
                 "attention_head_dim": 8, "norm_num_groups": 4},
        "text": {"vocab_size": 48, "d_model": 16, "layers": 1, "heads": 2, "head_dim": 8, "ffn_dim": 32},
        "sampling": {"prompts": ["a red square"], "num_images": 1, "num_inference_steps": 2},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "mixed_precision": "no", **TRAIN_FAST, **train},
    }


def ldm_recipe(*args, overrides=(), **kwargs):
    return build_recipe("ldm", ldm_dict(*args, **kwargs), overrides)


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported pipeline / model folder, keyed by file and name."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).rglob("*.safetensors")):
        for key, value in load_file(file).items():
            out[f"{file.parent.name}/{key}"] = value
    return out
