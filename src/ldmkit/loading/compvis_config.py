"""The YAML of an original CompVis latent-diffusion checkpoint (a Lightning ``.ckpt`` plus its OmegaConf
YAML), read as data: which family it is and the diffusers configs of its parts (:class:`CompVisSpec`).

The YAML is read with ``yaml.safe_load``; no ``target:`` is imported or run. Its ``LatentDiffusion`` section
is mapped onto ldmkit's models by name (classes are looked up by the assembly, ``ldmkit.assembly.single_file``,
which also renames the checkpoint's keys with the explicit tables of ``compvis_unet`` (UNet),
``compvis_first_stage`` (autoencoder) and ``compvis_text`` (BERT, class embedder)). Five families are
recognised by their conditioning (the published configs they come from); each pipeline names its family
(``compvis_family=`` on its class, see ``ldmkit.registry``):

===================  ===============================  ===============================================
family               conditioning                     pipeline
===================  ===============================  ===============================================
text-to-image        BERTEmbedder, crossattn          LDMTextToImagePipeline (txt2img-1p4B)
super-resolution     torch.nn.Identity, concat        LDMSuperResolutionPipeline (bsr_sr)
unconditional        __is_unconditional__             LDMPipeline (celeba256, ffhq, lsun, ...)
class-conditional    ClassEmbedder, crossattn         LDMClassConditionalPipeline (cin256)
inpainting           __is_first_stage__, concat       LDMInpaintPipeline (inpainting_big)
===================  ===============================  ===============================================

The sampler is the original DDIM: :meth:`DDIMScheduler.compvis` with the YAML's ``linear_start`` /
``linear_end`` (timesteps ``0, k, 2k, ... + 1``, last step against ``alphas_cumprod[0]``); PLMS is
``PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import LDMKitError
from .compvis_first_stage import diffusers_first_stage_config
from .compvis_text import BERT_TARGET, CLASS_TARGET
from .compvis_unet import AdmUNet, diffusers_unet_config, parse_unet

LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
# The families parse_config recognises; each must have exactly one pipeline in registry.COMPVIS_FAMILIES.
FAMILIES = ("text-to-image", "super-resolution", "unconditional", "class-conditional", "inpainting")
_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample"}
BERT_VOCAB_REPO = "bert-base-uncased"  # BERTTokenizer's vocabulary, not part of the checkpoint


# ----------------------------------------------------------------------------------------- reading
def read_config(config) -> dict:
    """A YAML file (path), YAML text already parsed (a dict), read with ``yaml.safe_load`` only."""
    if isinstance(config, Mapping):
        return dict(config)
    if config is None:
        raise LDMKitError("An original CompVis checkpoint needs its YAML config: pass config='config.yaml' "
                          "(the file shipped beside model.ckpt, e.g. models/ldm/<name>/config.yaml).")
    try:
        import yaml
    except ModuleNotFoundError:
        raise LDMKitError("Reading a CompVis config.yaml needs PyYAML: pip install pyyaml.") from None
    path = Path(config).expanduser()
    if not path.is_file():
        raise LDMKitError(f"Config file {path} does not exist. Pass the config.yaml of the checkpoint.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LDMKitError(f"{path} is not a plain YAML config ({e.__class__.__name__}: {e}). Only data is "
                          "read (yaml.safe_load): tags that build Python objects are refused.") from None
    if not isinstance(data, dict):
        raise LDMKitError(f"{path} must hold a YAML mapping with a 'model' section.")
    return data


# ----------------------------------------------------------------------------------------- the YAML
@dataclass(frozen=True)
class CompVisSpec:
    """What the YAML says about the model, mapped onto ldmkit classes and configs."""

    family: str
    unet: AdmUNet
    unet_class: str
    unet_config: dict
    first_stage_class: str
    first_stage_config: dict
    cond_stage: dict | str | None
    scheduler_config: dict
    use_ema: bool
    scale_by_std: bool
    learn_logvar: bool


def parse_config(config: dict) -> CompVisSpec:
    model = config.get("model")
    if not isinstance(model, dict):
        raise LDMKitError("The config has no 'model' section; pass the CompVis config.yaml of the checkpoint.")
    target = model.get("target")
    if target != LDM_TARGET:
        raise LDMKitError(f"model target {target!r} is not supported; ldmkit loads latent diffusion models "
                          f"({LDM_TARGET}).")
    p = dict(model.get("params") or {})
    if p.get("beta_schedule", "linear") != "linear" or p.get("given_betas") is not None:
        raise LDMKitError(f"beta_schedule {p.get('beta_schedule')!r} / given_betas is not supported; ldmkit "
                          "loads the 'linear' schedule of the published LDMs.")
    parameterization = p.get("parameterization", "eps")
    if parameterization not in _PREDICTION_TYPES:
        raise LDMKitError(f"parameterization {parameterization!r} is not supported (eps or x0).")
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in p:
            raise LDMKitError(f"The config's model.params lacks {key!r}.")
    scale_factor = float(p.get("scale_factor", 1.0))
    unet = parse_unet(p["unet_config"])
    unet_class, unet_config = diffusers_unet_config(unet)
    fs_class, fs_config = diffusers_first_stage_config(p["first_stage_config"], scale_factor)
    cond = p["cond_stage_config"]
    key = p.get("conditioning_key") or ("concat" if p.get("concat_mode", True) else "crossattn")
    if cond == "__is_unconditional__":
        key = None
    latent = fs_config.get("vq_embed_dim") or fs_config["latent_channels"]
    if unet.out_channels != latent:
        raise LDMKitError(f"The UNet predicts {unet.out_channels} channels but the first stage's latent has "
                          f"{latent}; the config is inconsistent.")
    family = _family(cond, key, unet, latent)
    timesteps = int(p.get("timesteps", 1000))
    scheduler = {"num_train_timesteps": timesteps, "beta_start": float(p.get("linear_start", 1e-4)),
                 "beta_end": float(p.get("linear_end", 2e-2)),
                 "prediction_type": _PREDICTION_TYPES[parameterization]}
    return CompVisSpec(family, unet, unet_class, unet_config, fs_class, fs_config, cond, scheduler,
                       use_ema=bool(p.get("use_ema", True)), scale_by_std=bool(p.get("scale_by_std", False)),
                       learn_logvar=bool(p.get("learn_logvar", False)))


def _family(cond, key, unet: AdmUNet, latent: int) -> str:
    if key not in (None, "concat", "crossattn"):
        raise LDMKitError(f"conditioning_key {key!r} is not supported (concat and crossattn are).")
    if cond == "__is_unconditional__":
        _require(not unet.spatial_transformer and unet.in_channels == latent, "an unconditional model")
        return "unconditional"
    if cond == "__is_first_stage__":
        # inpainting_big: concat of [first-stage latent of the masked image, mask at latent size].
        _require(key == "concat" and unet.in_channels == 2 * latent + 1,
                 "first-stage conditioning other than inpainting ([x, masked-image latent, mask])")
        return "inpainting"
    target = cond.get("target") if isinstance(cond, dict) else cond
    if target == BERT_TARGET:
        _require(key == "crossattn" and unet.spatial_transformer, "a BERTEmbedder without cross-attention")
        return "text-to-image"
    if target == CLASS_TARGET:
        _require(key == "crossattn" and unet.spatial_transformer, "a ClassEmbedder without cross-attention")
        return "class-conditional"
    if target == "torch.nn.Identity":
        _require(key == "concat" and unet.in_channels == latent + 3, "identity conditioning other than "
                 "super-resolution ([x, low-resolution RGB image])")
        return "super-resolution"
    raise LDMKitError(f"cond_stage_config target {target!r} is not supported. ldmkit loads {BERT_TARGET}, "
                      f"{CLASS_TARGET}, torch.nn.Identity (super-resolution), __is_first_stage__ (inpainting) "
                      "and __is_unconditional__.")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise LDMKitError(f"The config describes {what}, which ldmkit does not support.")
