"""The reference models of the parity tests: tiny random networks and pipelines built with diffusers' own
classes, and the helpers that make a comparison with them meaningful."""

from __future__ import annotations

import torch

# A small WordPiece vocabulary: special tokens, letters, a few words and ##-pieces, punctuation, CJK.
TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    + ["a", "painting", "of", "squirrel", "eating", "burger", "red", "square", "blue", "circle", "the", "cafe",
       "##s", "##ing", "##ed", "photo", "cat", "dog", "green"]
    + list(".,!?'\"-()") + ["中", "国", "猫"]
)


def write_vocab(path) -> str:
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return str(path)


def build_diffusers_text2img(folder, seed: int = 0):
    """A tiny LDMTextToImagePipeline made and saved by diffusers. Latent factor 8, like the published one."""
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8)
    bert = LDMBertModel(LDMBertConfig(d_model=32, encoder_attention_heads=2, head_dim=16, encoder_ffn_dim=37,
                                      encoder_layers=2, vocab_size=len(TINY_VOCAB), max_position_embeddings=77))
    perturb(unet, vae, bert, seed=seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(write_vocab(folder / "vocab.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tok, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def build_diffusers_vq(seed: int = 0, scaling_factor: float | None = None):
    from diffusers import VQModel

    torch.manual_seed(seed)
    kw = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(16, 16, 32),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=64, **kw)


def build_diffusers_unet2d(in_channels: int, seed: int = 0, sample_size: int = 16):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=3,
                       block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
                       attention_head_dim=8)


def perturb(*modules, seed: int = 1, scale: float = 0.02):
    """Random init leaves some weights at zero: give every parameter a visible value."""
    for module in modules:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def diffusers_ddim(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **kw)


def save_diffusers(cls_name: str, config: dict, folder, seed: int = 0):
    """A diffusers model ``cls_name(**config)``, perturbed, saved to ``folder`` with save_pretrained."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**config).eval()
    perturb(model, seed=seed + 1)  # random init leaves weights at 0 / 1: make parity meaningful
    model.save_pretrained(folder)
    return model
