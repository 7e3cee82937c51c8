"""The original (ADM-style) LDM UNet, ``ldm.modules.diffusionmodules.openaimodel.UNetModel``: its YAML
parameters as a diffusers UNet config, and its keys (``input_blocks`` / ``middle_block`` / ``output_blocks``)
as diffusers' (``down_blocks`` / ``mid_block`` / ``up_blocks``).

UNets with spatial transformers (cross-attention) become :class:`UNet2DConditionModel`, those with the
ADM ``AttentionBlock`` (or none) :class:`UNet2DModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..errors import LDMKitError
from .compvis_keys import WHOLE, Rule

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"

# ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, linear], out_layers = [GroupNorm, SiLU,
# dropout, conv], skip_connection = 1x1 conv (only when the width changes).
RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
# AttentionBlock: GroupNorm, one fused qkv Conv1d, output Conv1d.
ATTENTION_BLOCK = {"norm": "group_norm", "qkv": ("to_q", "to_k", "to_v"), "proj_out": "to_out.0"}
DOWNSAMPLE = {"op": "conv"}
UPSAMPLE = {"conv": "conv"}

# Parameters that change nothing at inference, or that we handle; anything else is refused by name.
_HANDLED = {"image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
            "channel_mult", "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
            "resblock_updown", "use_new_attention_order", "use_spatial_transformer", "transformer_depth",
            "context_dim", "num_classes", "use_linear_in_transformer", "legacy"}
_INERT = {"use_checkpoint": None, "use_fp16": None, "use_bf16": None, "dropout": None, "dims": 2,
          "conv_resample": True, "n_embed": None, "disable_self_attentions": None, "num_attention_blocks": None,
          "disable_middle_self_attn": False, "adm_in_channels": None}


@dataclass(frozen=True)
class AdmUNet:
    """What of an original UNet config decides the network."""

    image_size: int
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: frozenset[int]  # level indices (0 = full resolution) with attention
    heads: tuple[int, ...]  # attention heads per level (the mid block uses the last)
    spatial_transformer: bool
    transformer_depth: int
    context_dim: int | None
    resblock_updown: bool
    scale_shift: bool
    new_attention_order: bool
    linear_projection: bool
    num_classes: int | None

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]


def parse_unet(unet_config: dict) -> AdmUNet:
    """Read ``unet_config`` (``target`` + ``params``) the way ``UNetModel.__init__`` reads it."""
    target = unet_config.get("target")
    if target != UNET_TARGET:
        raise LDMKitError(f"unet_config target {target!r} is not supported; ldmkit loads {UNET_TARGET}.")
    p = dict(unet_config.get("params") or {})
    unknown = sorted(set(p) - _HANDLED - set(_INERT))
    if unknown:
        raise LDMKitError(f"unet_config sets {', '.join(unknown)}, which ldmkit does not support.")
    for key, inert in _INERT.items():
        if inert is not None and key in p and p[key] not in (inert, None):
            raise LDMKitError(f"unet_config sets {key}={p[key]!r}; ldmkit supports only {inert!r}.")
    try:
        mult = tuple(int(m) for m in p.get("channel_mult", (1, 2, 4, 8)))
        model_channels = int(p["model_channels"])
        num_res_blocks = p["num_res_blocks"]
        resolutions = {int(r) for r in p["attention_resolutions"]}
    except KeyError as e:
        raise LDMKitError(f"unet_config lacks {e.args[0]!r}.") from None
    if not isinstance(num_res_blocks, int):
        raise LDMKitError("unet_config num_res_blocks must be one integer (per-level lists are not supported).")
    num_heads, head_channels = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    heads_up = int(p.get("num_heads_upsample", -1))
    spatial = bool(p.get("use_spatial_transformer", False))
    if num_heads == -1 and head_channels == -1:
        raise LDMKitError("unet_config sets neither num_heads nor num_head_channels.")
    # ADM: a level's heads are width // num_head_channels when that is given, else num_heads. `legacy` only
    # changes how UNetModel.__init__ derives dim_head on the way, never the head count, so it needs no handling.
    heads = tuple(model_channels * m // head_channels if head_channels != -1 else num_heads for m in mult)
    if not spatial and head_channels == -1 and heads_up not in (-1, num_heads):
        raise LDMKitError("unet_config num_heads_upsample differs from num_heads; not supported.")
    for width, h in zip((model_channels * m for m in mult), heads):
        if h < 1 or width % h:
            raise LDMKitError(f"unet_config: width {width} does not split into {h} attention heads.")
    levels = frozenset(level for level in range(len(mult)) if 2 ** level in resolutions)
    context_dim = p.get("context_dim")
    if spatial and context_dim is None:
        raise LDMKitError("unet_config uses spatial transformers but gives no context_dim.")
    if isinstance(context_dim, list | tuple):
        raise LDMKitError("unet_config context_dim must be one integer (per-level lists are not supported).")
    layout = AdmUNet(
        image_size=int(p.get("image_size", 32)), in_channels=int(p["in_channels"]),
        out_channels=int(p["out_channels"]), model_channels=model_channels, channel_mult=mult,
        num_res_blocks=num_res_blocks, attention_levels=levels, heads=heads, spatial_transformer=spatial,
        transformer_depth=int(p.get("transformer_depth", 1)), context_dim=context_dim,
        resblock_updown=bool(p.get("resblock_updown", False)), scale_shift=bool(p.get("use_scale_shift_norm", False)),
        new_attention_order=bool(p.get("use_new_attention_order", False)),
        linear_projection=bool(p.get("use_linear_in_transformer", False)), num_classes=p.get("num_classes"))
    if spatial and layout.resblock_updown:
        raise LDMKitError("unet_config combines spatial transformers with resblock_updown; not supported.")
    return layout


def _one_or_list(values: list):
    return values[0] if len(set(values)) == 1 else values


def diffusers_unet_config(u: AdmUNet) -> tuple[str, dict]:
    """The ldmkit / diffusers class name and config of the same network."""
    n = len(u.channel_mult)
    common = {
        "sample_size": u.image_size, "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": u.widths, "layers_per_block": u.num_res_blocks, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1,
        "resnet_time_scale_shift": "scale_shift" if u.scale_shift else "default",
        "num_class_embeds": u.num_classes,
    }
    attn = [level in u.attention_levels for level in range(n)]
    if u.spatial_transformer:
        return "UNet2DConditionModel", {
            **common,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
            # diffusers' historical misnomer: attention_head_dim is the number of heads here.
            "attention_head_dim": _one_or_list(list(u.heads)),
            "cross_attention_dim": u.context_dim, "transformer_layers_per_block": u.transformer_depth,
            "use_linear_projection": u.linear_projection, "upcast_attention": False,
        }
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if u.resblock_updown else (
        "DownBlock2D", "UpBlock2D")
    return "UNet2DModel", {
        **common,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in attn[::-1]],
        "attention_head_dim": _one_or_list([w // h for w, h in zip(u.widths, u.heads)]),
        "downsample_type": "resnet" if u.resblock_updown else "conv",
        "upsample_type": "resnet" if u.resblock_updown else "conv",
        # The ADM mid-block attention always has its GroupNorm (diffusers drops it with scale-shift unless set).
        "attn_norm_num_groups": 32 if u.scale_shift else None,
        "add_attention": True,
    }


def split_qkv(weight: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """The fused ``qkv`` projection as separate q, k, v. ``QKVAttentionLegacy`` lays the output channels
    out per head as ``[head][q|k|v][d]``; ``QKVAttention`` (use_new_attention_order) as ``[q|k|v][head][d]``."""
    rest = weight.shape[1:]
    if new_order:
        return tuple(weight.reshape(3, -1, *rest).unbind(0))
    per_head = weight.reshape(heads, 3, -1, *rest)
    return tuple(per_head[:, i].reshape(-1, *rest) for i in range(3))


def unet_rules(u: AdmUNet) -> list[Rule]:
    """The key table of the UNet, module by module, in the order ``UNetModel.__init__`` builds them."""
    n = len(u.channel_mult)

    def attention(source: str, target: str, level: int) -> Rule:
        if u.spatial_transformer:  # SpatialTransformer: the same sub-module names as diffusers'
            return Rule(source, target)
        return Rule(source, target, ATTENTION_BLOCK, to_linear=True,
                    split=partial(split_qkv, heads=u.heads[level], new_order=u.new_attention_order))

    rules = [Rule("time_embed.0", "time_embedding.linear_1", WHOLE),
             Rule("time_embed.2", "time_embedding.linear_2", WHOLE),
             Rule("input_blocks.0.0", "conv_in", WHOLE),
             Rule("out.0", "conv_norm_out", WHOLE),
             Rule("out.2", "conv_out", WHOLE)]
    if u.num_classes is not None:
        rules.append(Rule("label_emb", "class_embedding", WHOLE))
    index = 1
    for level in range(n):
        for j in range(u.num_res_blocks):
            rules.append(Rule(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", RESBLOCK))
            if level in u.attention_levels:
                rules.append(attention(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", level))
            index += 1
        if level < n - 1:
            rules.append(Rule(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0",
                              RESBLOCK if u.resblock_updown else DOWNSAMPLE))
            index += 1
    rules += [Rule("middle_block.0", "mid_block.resnets.0", RESBLOCK),
              attention("middle_block.1", "mid_block.attentions.0", n - 1),
              Rule("middle_block.2", "mid_block.resnets.1", RESBLOCK)]
    index = 0
    for i, level in enumerate(reversed(range(n))):
        for j in range(u.num_res_blocks + 1):
            rules.append(Rule(f"output_blocks.{index}.0", f"up_blocks.{i}.resnets.{j}", RESBLOCK))
            sub = 1
            if level in u.attention_levels:
                rules.append(attention(f"output_blocks.{index}.1", f"up_blocks.{i}.attentions.{j}", level))
                sub = 2
            if level > 0 and j == u.num_res_blocks:
                rules.append(Rule(f"output_blocks.{index}.{sub}", f"up_blocks.{i}.upsamplers.0",
                                  RESBLOCK if u.resblock_updown else UPSAMPLE))
            index += 1
    return rules
