"""Tiny random ldmkit pipelines of every kind, built in memory with ldmkit's own classes (no files, no
diffusers): for tests that exercise the pipelines' call arguments, not their numbers."""

from __future__ import annotations

import functools

import torch

from .. import (
    ClassEmbedder,
    DDIMScheduler,
    DiffusionPipeline,
    LDMClassConditionalPipeline,
    LDMInpaintPipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)


def _vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16),
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32)


def _unet2d(in_channels: int, sample_size: int = 8) -> UNet2DModel:
    torch.manual_seed(1)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear", clip_sample=False)


def _quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def uncond() -> LDMPipeline:
    """8x8 latents, 16x16 images."""
    return _quiet(LDMPipeline(vqvae=_vq(), unet=_unet2d(3), scheduler=_scheduler()))


@functools.cache
def superres() -> LDMSuperResolutionPipeline:
    """2x upscaling; inputs of any size (padded to a multiple of 2)."""
    return _quiet(LDMSuperResolutionPipeline(vqvae=_vq(), unet=_unet2d(6), scheduler=_scheduler()))


@functools.cache
def inpaint() -> LDMInpaintPipeline:
    """Images and masks of a multiple of 4 pixels (16x16 in the tests)."""
    return _quiet(LDMInpaintPipeline(vqvae=_vq(), unet=_unet2d(7), scheduler=_scheduler()))


@functools.cache
def class_conditional() -> LDMClassConditionalPipeline:
    """10 classes and the unconditional one (10); 16x16 images."""
    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=8)
    return _quiet(LDMClassConditionalPipeline(vqvae=_vq(), class_embedder=ClassEmbedder(11, 8), unet=unet,
                                              scheduler=_scheduler()))


@functools.cache
def text2img() -> DiffusionPipeline:
    """The bundled emoji model (32x32 images by default), loaded once per test process."""
    return _quiet(DiffusionPipeline.from_pretrained("ldmkit:emoji-text2img"))
