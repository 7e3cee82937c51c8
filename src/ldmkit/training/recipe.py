"""Training recipes: one YAML file per run, read into typed dataclasses.

Every key is checked: an unknown key is an error that names it and the nearest valid key (difflib), a
value of the wrong type is an error that names the key and the expected type. Command-line overrides
(``train.lr=2e-4``) are merged into the YAML before checking, so they get the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import LDMKitError

# ------------------------------------------------------------------------------------------------ sections


@dataclass
class DataConfig:
    """An image folder: captions from metadata.jsonl / metadata.csv (Hugging Face "imagefolder"
    convention: ``file_name`` and ``text``), class labels from sub-folders."""

    root: str = ""
    resolution: int = 256
    random_crop: bool = True            # False: centre crop
    crop_size: int | None = None        # autoencoders: train on crops this big of the resized images (cheaper
                                        # per step; the networks are convolutional); None: the whole resolution
    random_flip: bool = True
    caption_column: str = "text"
    caption_template: str | None = None  # e.g. "a photo of a {label}": captions from sub-folder labels
    label_column: str | None = None     # class labels from this metadata column (e.g. "label"); None: sub-folders
    holdout: float = 0.0                # held-out images for evaluation: a fraction (< 1) or a count
    num_workers: int = 2
    latent_cache: bool = False          # encode the dataset to latents once (LDM only)
    latent_cache_dir: str | None = None  # default: $LDMKIT_CACHE or ~/.cache/ldmkit/latents
    sr_scale: int = 4                   # super-resolution: low-res = high-res / sr_scale
    degradation: Literal["bicubic", "bsr"] = "bicubic"  # bsr: blur, noise and JPEG as the SR paper


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    export: bool = True                 # export (and sample with) the EMA weights


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8                 # images per optimizer step, over all processes and micro-steps
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio at max_steps
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None   # None / "auto": on for GPU mixed precision (slower on CPU, measured)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, one more forward
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ema: EMAConfig = field(default_factory=EMAConfig)
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last: int = 3
    sample_every: int = 500             # 0: never (a final grid is always written)
    eval_every: int = 500               # autoencoder PSNR on the held-out split; 0: only at the end
    progress_bar: bool = True


@dataclass
class AutoencoderModelConfig:
    type: Literal["kl", "vq"] = "kl"
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    num_vq_embeddings: int = 8192
    vq_embed_dim: int | None = None
    scaling_factor: float | None = None  # None / "auto": 1 / std of the latents (KL), 1.0 (VQ)
    init_from: str | None = None         # fine-tune a saved autoencoder folder


@dataclass
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    codebook: Literal["ema", "straight_through"] = "ema"
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25
    codebook_ema_decay: float = 0.99
    codebook_restart_threshold: float = 0.03  # EMA codebook: restart codes used less than this per step; 0: never
    disc_start: int | None = None       # step at which the patch discriminator starts; None: no GAN
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_channels: int = 64
    disc_norm: Literal["batch", "group"] = "batch"  # group: independent of how the batch is split
    disc_lr: float | None = None        # default: train.lr


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [192, 384, 576, 960])
    layers_per_block: int = 2
    attention_levels: list[bool] | None = None  # per level; default: all but the first
    num_attention_heads: int = 8        # text UNet: heads per cross-attention block
    attention_head_dim: int | None = 32  # concat / unconditional UNet: channels per head (None: one head)
    norm_num_groups: int = 32
    dropout: float = 0.0


@dataclass
class TextConfig:
    """LDMBert trained jointly with the UNet, from a WordPiece tokenizer trained on the captions."""

    tokenizer: str | None = None        # a saved tokenizer folder; None: train one on the captions
    vocab_size: int = 8000
    d_model: int = 512
    layers: int = 8
    heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 2048
    dropout: float = 0.0
    max_length: int = 77                # diffusers' pipeline pads prompts to 77 tokens
    caption_dropout: float = 0.1        # train unconditionally this often, for classifier-free guidance


@dataclass
class ClassConfig:
    """``conditioning: class``: a ClassEmbedder (one vector per class, plus the null class) trained jointly."""

    embed_dim: int = 512                # the one-token context the UNet cross-attends to
    class_dropout: float = 0.1          # train on the null class this often, for classifier-free guidance


@dataclass
class MaskConfig:
    """``conditioning: inpaint``: random masks as LaMa's thick strokes and boxes (training/masks.py)."""

    box_probability: float = 0.5        # boxes for this share of the images, strokes for the rest (LaMa: 1:1)
    max_strokes: int = 5
    max_boxes: int = 3
    size: float = 1.0                   # times LaMa's sizes (pixels at 256 x 256, scaled to the resolution)


@dataclass
class DiffusionConfig:
    # Presets are the schedules of the published LDMs (scaled_linear, 1000 steps).
    schedule: Literal["text2img-256", "superres-4x", "celebahq-256", "custom"] = "text2img-256"
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None
    num_train_timesteps: int = 1000
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=lambda: ["a painting of a squirrel eating a burger"])
    classes: list[str] = field(default_factory=list)  # class grids: names; empty: the first num_images classes
    num_images: int = 4                 # unconditional / super-resolution grids
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 0.0


@dataclass
class AutoencoderRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    kind: Literal["autoencoder"] = "autoencoder"
    output_dir: str = ""
    seed: int = 0
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LDMRecipe:
    autoencoder: str                    # a folder written by the autoencoder run (save_pretrained)
    kind: Literal["ldm"] = "ldm"
    init_from: str | None = None        # fine-tune: a pipeline folder or bundled name whose denoiser starts the run
    conditioning: Literal["text", "concat", "none", "class", "inpaint"] = "text"
    output_dir: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    classes: ClassConfig = field(default_factory=ClassConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RECIPES = {"autoencoder": AutoencoderRecipe, "ldm": LDMRecipe}
Recipe = AutoencoderRecipe | LDMRecipe

# ------------------------------------------------------------------------------------------------ loading


def load_recipe(kind: str, path: str | Path | None = None, overrides: Sequence[str] = (),
                output_dir: str | None = None) -> Recipe:
    """Read a YAML recipe for ``kind`` ("autoencoder" or "ldm"), apply ``key.sub=value`` overrides, check it."""
    data = read_yaml(path) if path is not None else {}
    return build_recipe(kind, data, overrides, output_dir, where=str(path) if path is not None else "recipe")


def build_recipe(kind: str, data: Mapping, overrides: Sequence[str] = (), output_dir: str | None = None,
                 where: str = "recipe") -> Recipe:
    """The same as :func:`load_recipe` for a recipe already read into a dict."""
    if kind not in RECIPES:
        raise LDMKitError(f"Unknown training kind {kind!r}; use 'autoencoder' or 'ldm'.")
    data = copy.deepcopy(dict(data))
    for item in overrides:
        apply_override(data, item)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    stated = data.get("kind", kind)
    if stated != kind:
        raise LDMKitError(f"{where} is a {stated!r} recipe but was given to `train {kind}`; "
                          f"run `ldmkit train {stated} --config {where}`.")
    recipe = from_dict(RECIPES[kind], data, where)
    validate(recipe, where)
    return recipe


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LDMKitError(f"Recipe {path} does not exist. Pass --config with a YAML file (see recipes/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LDMKitError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LDMKitError(f"{path} must hold a mapping of sections (data:, train:, ...), "
                          f"found a {type(data).__name__}.")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: YAML syntax (numbers, true/false, null, [lists]), with 1e-4 read as a float."""
    import yaml

    try:
        return float(text) if _looks_like_float(text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return not text.strip().lstrip("+-").isdigit() and text.strip().lower() not in ("nan", "inf", "infinity")


def apply_override(data: dict, item: str) -> None:
    """Merge ``a.b.c=value`` into the nested dict ``data``."""
    if "=" not in item:
        raise LDMKitError(f"Override {item!r} must look like section.key=value, e.g. train.lr=2e-4.")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise LDMKitError(f"Override {item!r} has no key before '='.")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LDMKitError(f"Override {item!r}: {part} is a value, not a section.")
    node[parts[-1]] = parse_value(value)


def from_dict(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``where`` names it in errors."""
    if not isinstance(data, Mapping):
        raise LDMKitError(f"{where} must be a mapping of keys, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_key(str(key), names, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], f"{where}: {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = " (a folder the autoencoder run exported)" if f.name == "autoencoder" else ""
            raise LDMKitError(f"{where}: the required key {f.name!r}{hint} is missing.")
    return cls(**kwargs)


def unknown_key(key: str, valid: list[str], where: str) -> LDMKitError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return LDMKitError(f"{where}: unknown key {key!r}.{hint} Valid keys here: {', '.join(valid)}.")


def coerce(value: Any, hint, where: str) -> Any:
    """Check (and gently convert) ``value`` against a type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, where.replace(": ", "."))
    if origin in (typing.Union, types.UnionType):
        if value is None or (value == "auto" and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except LDMKitError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else LDMKitError(
            f"{where}: {value!r} is not a valid value ({_type_name(hint)} expected).")
    if origin is Literal:
        if isinstance(value, bool) and ("yes" if value else "no") in args:
            return "yes" if value else "no"  # YAML 1.1 reads a bare no / yes as a boolean
        if value in args and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint_text = f" Did you mean {close[0]!r}?" if close else ""
        raise LDMKitError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}.{hint_text}")
    if origin is list:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise LDMKitError(f"{where}: expected a list, got {value!r}.")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise LDMKitError(f"{where}: expected true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LDMKitError(f"{where}: expected an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        raise LDMKitError(f"{where}: expected a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise LDMKitError(f"{where}: expected a string, got {value!r}.")
    return value


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")


# ---------------------------------------------------------------------------------------------- validation


def validate(recipe: Recipe, where: str) -> None:
    """Cross-field checks that types alone cannot express."""
    data, train = recipe.data, recipe.train
    if not data.root:
        raise LDMKitError(f"{where}: data.root is missing: the folder of training images.")
    if not recipe.output_dir:
        raise LDMKitError(f"{where}: output_dir is missing; set it in the recipe or pass --output-dir.")
    positive = {"data.resolution": data.resolution, "train.max_steps": train.max_steps,
                "train.batch_size": train.batch_size,
                "train.gradient_accumulation_steps": train.gradient_accumulation_steps,
                "train.log_every": train.log_every, "train.checkpoint_every": train.checkpoint_every,
                "train.keep_last": train.keep_last, "data.sr_scale": data.sr_scale}
    for name, value in positive.items():
        if value < 1:
            raise LDMKitError(f"{where}: {name} must be at least 1, got {value}.")
    for name, value in {"train.lr": train.lr, "data.holdout": data.holdout, "data.num_workers": data.num_workers,
                        "train.warmup_steps": train.warmup_steps, "train.sample_every": train.sample_every,
                        "train.eval_every": train.eval_every, "train.weight_decay": train.weight_decay}.items():
        if value < 0:
            raise LDMKitError(f"{where}: {name} must be >= 0, got {value}.")
    if len(train.adam_betas) != 2 or not all(0 <= b < 1 for b in train.adam_betas):
        raise LDMKitError(f"{where}: train.adam_betas must be two numbers in [0, 1), got {train.adam_betas}.")
    if not 0 <= train.ema.decay < 1:
        raise LDMKitError(f"{where}: train.ema.decay must be in [0, 1), got {train.ema.decay}.")
    if data.caption_template is not None and "{label}" not in data.caption_template:
        raise LDMKitError(f"{where}: data.caption_template must contain {{label}}, e.g. 'a photo of a {{label}}'.")
    if isinstance(recipe, AutoencoderRecipe):
        _validate_autoencoder(recipe, where)
    else:
        _validate_ldm(recipe, where)


def _validate_autoencoder(recipe: AutoencoderRecipe, where: str) -> None:
    model = recipe.model
    if not model.block_out_channels:
        raise LDMKitError(f"{where}: model.block_out_channels needs at least one level.")
    bad = [c for c in model.block_out_channels if c % model.norm_num_groups]
    if bad:
        raise LDMKitError(f"{where}: model.block_out_channels {bad} are not multiples of "
                          f"model.norm_num_groups={model.norm_num_groups}.")
    factor = 2 ** (len(model.block_out_channels) - 1)
    if recipe.data.resolution % factor:
        raise LDMKitError(f"{where}: data.resolution={recipe.data.resolution} is not a multiple of the "
                          f"autoencoder's downsampling factor {factor}.")
    if recipe.data.latent_cache:
        raise LDMKitError(f"{where}: data.latent_cache is for LDM training (it skips the encoder); "
                          "an autoencoder trains on pixels. Remove it.")
    crop = recipe.data.crop_size
    if crop is not None and (crop <= 0 or crop > recipe.data.resolution or crop % factor):
        raise LDMKitError(f"{where}: data.crop_size={crop} must be a positive multiple of the autoencoder's "
                          f"factor {factor}, at most data.resolution={recipe.data.resolution}.")


def _validate_ldm(recipe: LDMRecipe, where: str) -> None:
    unet, text = recipe.unet, recipe.text
    if recipe.data.crop_size is not None:
        raise LDMKitError(f"{where}: data.crop_size is for autoencoder training; an LDM trains on whole "
                          "data.resolution images. Remove it.")
    if not unet.block_out_channels:
        raise LDMKitError(f"{where}: unet.block_out_channels needs at least one level.")
    if unet.attention_levels is not None and len(unet.attention_levels) != len(unet.block_out_channels):
        raise LDMKitError(f"{where}: unet.attention_levels has {len(unet.attention_levels)} entries, "
                          f"unet.block_out_channels {len(unet.block_out_channels)}; give one per level.")
    bad = [c for c in unet.block_out_channels if c % unet.norm_num_groups]
    if bad:
        raise LDMKitError(f"{where}: unet.block_out_channels {bad} are not multiples of "
                          f"unet.norm_num_groups={unet.norm_num_groups}.")
    if not 0 <= text.caption_dropout < 1:
        raise LDMKitError(f"{where}: text.caption_dropout must be in [0, 1), got {text.caption_dropout}.")
    if not 0 <= recipe.classes.class_dropout < 1:
        raise LDMKitError(f"{where}: classes.class_dropout must be in [0, 1), got {recipe.classes.class_dropout}.")
    _validate_masks(recipe, where)
    if recipe.conditioning == "text" and text.max_length < 3:
        raise LDMKitError(f"{where}: text.max_length must be at least 3 ([CLS], a token, [SEP]).")
    if recipe.diffusion.schedule == "custom" and None in (recipe.diffusion.beta_start, recipe.diffusion.beta_end,
                                                          recipe.diffusion.beta_schedule):
        raise LDMKitError(f"{where}: diffusion.schedule 'custom' needs beta_start, beta_end and beta_schedule.")


def _validate_masks(recipe: LDMRecipe, where: str) -> None:
    m = recipe.masks
    if not 0 <= m.box_probability <= 1:
        raise LDMKitError(f"{where}: masks.box_probability must be in [0, 1], got {m.box_probability}.")
    if m.max_strokes < 1 or m.max_boxes < 1 or m.size <= 0:
        raise LDMKitError(f"{where}: masks.max_strokes and masks.max_boxes must be at least 1 and masks.size "
                          f"positive, got {m.max_strokes}, {m.max_boxes}, {m.size}.")
    if recipe.conditioning == "inpaint" and recipe.data.latent_cache:
        raise LDMKitError(f"{where}: data.latent_cache cannot serve inpainting: the masked image changes every "
                          "step and is encoded then. Set data.latent_cache: false.")
    if recipe.conditioning == "class" and recipe.classes.embed_dim < 1:
        raise LDMKitError(f"{where}: classes.embed_dim must be at least 1, got {recipe.classes.embed_dim}.")


def to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def to_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


__all__ = [
    "AutoencoderLossConfig", "AutoencoderModelConfig", "AutoencoderRecipe", "ClassConfig", "DataConfig",
    "DiffusionConfig", "EMAConfig", "LDMRecipe", "MaskConfig", "Recipe", "SamplingConfig", "TextConfig",
    "TrainConfig", "UNetConfig",
    "apply_override", "build_recipe", "from_dict", "load_recipe", "parse_value", "to_yaml",
]
