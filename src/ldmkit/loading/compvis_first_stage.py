"""The original first stages, ``ldm.models.autoencoder.AutoencoderKL`` and ``VQModelInterface``: their YAML
as a diffusers AutoencoderKL / VQModel config, and their keys (``encoder.down.N.block.M``, ``mid.attn_1``,
``decoder.up.N``, ...) as diffusers' (``encoder.down_blocks.N.resnets.M``, ``mid_block.attentions.0``, ...).
"""

from __future__ import annotations

from ..errors import LDMKitError
from .compvis_keys import WHOLE, Rule

KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"

# ResnetBlock of the autoencoder (no time embedding); nin_shortcut is the 1x1 conv used when widths differ.
AE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# AttnBlock: GroupNorm and four 1x1 convs (single-head attention), as linear layers in diffusers.
AE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
RESAMPLE = {"conv": "conv"}

_DDCONFIG_HANDLED = {"double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                     "num_res_blocks", "attn_resolutions", "dropout", "attn_type"}
_DDCONFIG_INERT = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
_VQ_INERT = {"remap": None, "use_ema": False}


def diffusers_first_stage_config(first_stage_config: dict, scale_factor: float) -> tuple[str, dict]:
    """The ldmkit / diffusers class name (``AutoencoderKL`` or ``VQModel``) and its config."""
    target = first_stage_config.get("target")
    if target not in (KL_TARGET, VQ_TARGET):
        raise LDMKitError(f"first_stage_config target {target!r} is not supported; ldmkit loads {KL_TARGET} "
                          f"and {VQ_TARGET}.")
    params = dict(first_stage_config.get("params") or {})
    dd = dict(params.get("ddconfig") or {})
    unknown = sorted(set(dd) - _DDCONFIG_HANDLED - set(_DDCONFIG_INERT))
    if unknown:
        raise LDMKitError(f"first_stage_config ddconfig sets {', '.join(unknown)}, which ldmkit does not support.")
    for key, value in [*_DDCONFIG_INERT.items(), *(_VQ_INERT.items() if target == VQ_TARGET else ())]:
        source = dd if key in _DDCONFIG_INERT else params
        if source.get(key, value) != value:
            raise LDMKitError(f"first_stage_config sets {key}={source[key]!r}; ldmkit supports only {value!r}.")
    if dd.get("attn_resolutions"):
        raise LDMKitError("first_stage_config has attention inside the resolution levels (attn_resolutions "
                          f"{list(dd['attn_resolutions'])}); ldmkit supports only attn_resolutions: [].")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "none"):
        raise LDMKitError(f"first_stage_config attn_type {attn_type!r} is not supported (use vanilla or none).")
    try:
        widths = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
        z_channels, embed_dim = int(dd["z_channels"]), int(params["embed_dim"])
        common = {
            "in_channels": int(dd["in_channels"]), "out_channels": int(dd["out_ch"]),
            "block_out_channels": widths, "layers_per_block": int(dd["num_res_blocks"]),
            "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "act_fn": "silu", "latent_channels": z_channels, "norm_num_groups": 32,
            "sample_size": int(dd["resolution"]), "scaling_factor": float(scale_factor),
            "mid_block_add_attention": attn_type == "vanilla",
        }
        if target == KL_TARGET:
            if not dd.get("double_z", True) or embed_dim != z_channels:
                raise LDMKitError("first_stage_config: ldmkit's AutoencoderKL needs double_z true and embed_dim "
                                  f"== z_channels (got double_z {dd.get('double_z')}, embed_dim {embed_dim}, "
                                  f"z_channels {z_channels}).")
            return "AutoencoderKL", common
        return "VQModel", {**common, "num_vq_embeddings": int(params["n_embed"]), "vq_embed_dim": embed_dim}
    except KeyError as e:
        raise LDMKitError(f"first_stage_config lacks {e.args[0]!r}.") from None


def first_stage_rules(config: dict, vq: bool) -> list[Rule]:
    """The key table of the autoencoder, from its diffusers config."""
    n = len(config["block_out_channels"])
    blocks = config["layers_per_block"]
    attention = config["mid_block_add_attention"]
    rules = [Rule("quant_conv", "quant_conv", WHOLE), Rule("post_quant_conv", "post_quant_conv", WHOLE)]
    if vq:
        rules.append(Rule("quantize", "quantize", {"embedding": "embedding"}))
    for part in ("encoder", "decoder"):
        rules += [Rule(f"{part}.conv_in", f"{part}.conv_in", WHOLE),
                  Rule(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", AE_RESBLOCK),
                  Rule(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", AE_RESBLOCK),
                  Rule(f"{part}.norm_out", f"{part}.conv_norm_out", WHOLE),
                  Rule(f"{part}.conv_out", f"{part}.conv_out", WHOLE)]
        if attention:
            rules.append(Rule(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", AE_ATTENTION, to_linear=True))
    for level in range(n):
        for j in range(blocks):
            rules.append(Rule(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                              AE_RESBLOCK))
        if level < n - 1:
            rules.append(Rule(f"encoder.down.{level}.downsample", f"encoder.down_blocks.{level}.downsamplers.0",
                              RESAMPLE))
    # The decoder's up.N counts from the full resolution, diffusers' up_blocks from the lowest.
    for i, level in enumerate(reversed(range(n))):
        for j in range(blocks + 1):
            rules.append(Rule(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", AE_RESBLOCK))
        if level > 0:
            rules.append(Rule(f"decoder.up.{level}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", RESAMPLE))
    return rules
