"""Second-stage training: the latent diffusion model on a frozen autoencoder's latents (Rombach et al. 2022,
sec. 3.2-3.3). Text conditioning trains LDMBert jointly with the UNet (sec. 3.3: "tau_theta and eps_theta
are jointly optimized", eq. 3); super-resolution concatenates the low-resolution image to the latent
(sec. 4.4); class conditioning trains a ClassEmbedder jointly, inpainting concatenates the masked image's
latent and the mask (both in ldm_conditions.py); unconditional models get none."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from ..configuration import read_json
from ..errors import LDMKitError
from ..loading.bundled import local_name
from ..models import AutoencoderKL, ClassEmbedder, LDMBertModel, UNet2DConditionModel, UNet2DModel, VQModel
from ..pipelines import (
    LDMClassConditionalPipeline,
    LDMInpaintPipeline,
    LDMPipeline,
    LDMSuperResolutionPipeline,
    LDMTextToImagePipeline,
)
from ..schedulers import DDIMScheduler, DDPMScheduler
from ..tokenizer import LDMTokenizer
from . import losses
from .data import ImageDataset, scan_folder
from .degradations import degrade
from .faults import commit_folder, removed_on_error
from .latent_cache import CachedLatentDataset, build_cache
from .ldm_conditions import class_ids, drop_labels, first_images, inpaint_condition, inpaint_grid
from .masks import step_masks
from .recipe import DiffusionConfig, LDMRecipe
from .run import Run, Task
from .step_random import StepRandom
from .trainer import train

logger = logging.getLogger("ldmkit.training")

# The noise schedules of the published LDMs (their configs' linear_start / linear_end; the CompVis "linear"
# schedule is diffusers' scaled_linear: square roots evenly spaced).
SCHEDULE_PRESETS = {
    "text2img-256": ("scaled_linear", 0.00085, 0.012),   # CompVis/ldm-text2im-large-256
    "superres-4x": ("scaled_linear", 0.0015, 0.0155),    # CompVis/ldm-super-resolution-4x-openimages
    "celebahq-256": ("scaled_linear", 0.0015, 0.0195),   # CompVis/ldm-celebahq-256
}


def schedule_config(cfg: DiffusionConfig) -> dict:
    schedule, start, end = SCHEDULE_PRESETS.get(cfg.schedule, (None, None, None))
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": cfg.beta_schedule or schedule,
            "beta_start": cfg.beta_start if cfg.beta_start is not None else start,
            "beta_end": cfg.beta_end if cfg.beta_end is not None else end, "prediction_type": cfg.prediction_type}


def sampling_scheduler(cfg: DiffusionConfig) -> DDIMScheduler:
    """The exported sampler: DDIM with the training betas and the settings of the published pipelines."""
    return DDIMScheduler(**schedule_config(cfg), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def load_autoencoder(path: str) -> AutoencoderKL | VQModel:
    folder = Path(local_name(path)).expanduser()
    if (folder / "model_index.json").is_file() and (folder / "vqvae" / "config.json").is_file():
        folder = folder / "vqvae"  # a pipeline (an exported LDM, a bundled model): its first stage
    if not (folder / "config.json").is_file():
        hint = " (the 'final' folder of an autoencoder run)"
        raise LDMKitError(f"autoencoder: {folder} is not a saved autoencoder{hint}. Train one with "
                          "`ldmkit train autoencoder` and point `autoencoder:` at its output_dir/final.")
    name = read_json(folder / "config.json").get("_class_name")
    classes = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
    if name not in classes:
        raise LDMKitError(f"autoencoder: {folder} holds a {name}, not an AutoencoderKL or VQModel.")
    return classes[name].from_pretrained(folder)


def init_denoiser(denoiser: Denoiser, source: str) -> None:
    """Fine-tuning (``init_from``): copy the UNet, and the LDMBert or class embedder, of a saved pipeline into
    the run's freshly built ones. The recipe must build the same networks: a different config is an error,
    because equal shapes can still compute differently (``attention_head_dim`` changes the heads, not a shape)."""
    folder = Path(local_name(source)).expanduser()
    if not (folder / "model_index.json").is_file():
        raise LDMKitError(f"init_from: {source} is not a saved pipeline folder (no model_index.json). Give a run's "
                          "output_dir/final or a bundled name such as ldmkit:emoji-inpaint.")
    parts = {"unet": denoiser.unet, "bert": denoiser.bert, "class_embedder": denoiser.embedder}
    for name, module in parts.items():
        if module is None:
            continue
        if not (folder / name / "config.json").is_file():
            raise LDMKitError(f"init_from: {folder} has no {name}/, so it is not a pipeline of this recipe's "
                              "conditioning; give a folder exported by a run with the same conditioning.")
        saved = type(module).from_pretrained(folder / name)
        ours = json.loads(json.dumps(dict(module.config)))
        theirs = json.loads(json.dumps(dict(saved.config)))
        differ = sorted(k for k in set(ours) | set(theirs) if not k.startswith("_") and ours.get(k) != theirs.get(k))
        if differ:
            detail = "; ".join(f"{k}: saved {theirs.get(k)!r}, recipe {ours.get(k)!r}" for k in differ)
            raise LDMKitError(f"init_from: {folder / name} differs from the network this recipe builds ({detail}). "
                              f"Make the recipe match {folder / name / 'config.json'}.")
        module.load_state_dict(saved.state_dict())
    logger.info("Starting from the weights of %s", folder)


def latent_channels(ae) -> int:
    if isinstance(ae, VQModel):
        return ae.config.vq_embed_dim or ae.config.latent_channels
    return ae.config.latent_channels


def build_unet(recipe: LDMRecipe, channels: int, size: int) -> nn.Module:
    u = recipe.unet
    levels = u.attention_levels or [False] + [True] * (len(u.block_out_channels) - 1)
    multiple = 2 ** (len(u.block_out_channels) - 1)
    if size % multiple:
        raise LDMKitError(f"The latents are {size}x{size} but a UNet with {len(u.block_out_channels)} levels needs "
                          f"a multiple of {multiple}: change data.resolution or unet.block_out_channels.")
    common = dict(sample_size=size, out_channels=channels, block_out_channels=list(u.block_out_channels),
                  layers_per_block=u.layers_per_block, norm_num_groups=u.norm_num_groups, dropout=u.dropout)
    if recipe.conditioning in ("text", "class"):
        bad = [c for c, a in zip(u.block_out_channels, levels) if a and c % u.num_attention_heads]
        if bad:
            raise LDMKitError(f"unet.block_out_channels {bad} are not divisible by unet.num_attention_heads="
                              f"{u.num_attention_heads}.")
        return UNet2DConditionModel(
            in_channels=channels, **common,
            cross_attention_dim=recipe.text.d_model if recipe.conditioning == "text" else recipe.classes.embed_dim,
            attention_head_dim=u.num_attention_heads,  # diffusers' name for the number of heads here
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)])
    # Super-resolution: the RGB low-res image; inpainting: the masked image's latent and the mask.
    extra = {"concat": 3, "inpaint": channels + 1}.get(recipe.conditioning, 0)
    return UNet2DModel(in_channels=channels + extra, **common, attention_head_dim=u.attention_head_dim,
                       down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
                       up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)])


class Denoiser(nn.Module):
    """What DDP wraps: the UNet and its condition encoder ``tau_theta`` (LDMBert for text, the ClassEmbedder
    for classes), trained as one network."""

    def __init__(self, unet: nn.Module, bert: LDMBertModel | None = None, embedder: ClassEmbedder | None = None):
        super().__init__()
        self.unet = unet
        self.bert = bert
        self.embedder = embedder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor | None = None,
                concat: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.bert is not None or self.embedder is not None:
            context = self.bert(input_ids)[0] if self.bert is not None else self.embedder(class_labels)
            return self.unet(noisy, timesteps, encoder_hidden_states=context.to(noisy.dtype)).sample
        if concat is not None:
            noisy = torch.cat([noisy, concat.to(noisy.dtype)], dim=1)
        return self.unet(noisy, timesteps).sample


@contextlib.contextmanager
def quiet_tokenizer():
    # Long captions are truncated on purpose in training; one warning at setup is enough, not one per batch.
    log = logging.getLogger("ldmkit")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class LDMTask(Task):
    def __init__(self, recipe: LDMRecipe):
        self.recipe = recipe
        self.wrapped = {}

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, run: Run) -> None:
        r = self.recipe
        self.run = run
        folder = scan_folder(r.data.root, r.data.caption_column, r.data.caption_template,
                             need_captions=r.conditioning == "text", label_column=r.data.label_column,
                             need_labels=r.conditioning == "class")
        self.records = folder.records
        self.class_names = folder.class_names
        if r.conditioning == "class":
            class_ids(r.sampling.classes, self.class_names, r.sampling.num_images)  # a typo fails now, not later
        self.ae = load_autoencoder(r.autoencoder).to(run.device).eval().requires_grad_(False)
        if run.channels_last:
            self.ae.to(memory_format=torch.channels_last)
        self.factor = 2 ** (len(self.ae.config.block_out_channels) - 1)
        if r.data.resolution % self.factor:
            raise LDMKitError(f"data.resolution={r.data.resolution} is not a multiple of the autoencoder's "
                              f"downsampling factor {self.factor}.")
        if r.conditioning == "concat" and r.data.sr_scale != self.factor:
            raise LDMKitError(f"Super-resolution concatenates the low-res image to the latent, so data.sr_scale "
                              f"({r.data.sr_scale}) must equal the autoencoder's factor ({self.factor}).")
        if r.conditioning == "text" and self.factor != 8:
            logger.warning("The autoencoder downsamples %dx: ldmkit's pipeline handles that, but diffusers' "
                           "LDMTextToImagePipeline sizes latents as height // 8, so with diffusers pass height "
                           "and width %g times the image size you want.", self.factor, 8 / self.factor)
        # The SR pipeline decodes latents as they are; the others divide by the autoencoder's scaling factor.
        self.scale = 1.0 if r.conditioning == "concat" else float(self.ae.config.scaling_factor)
        self.channels = latent_channels(self.ae)
        self.latent_size = r.data.resolution // self.factor

        self.tokenizer = self._tokenizer() if r.conditioning == "text" else None
        bert = None
        if self.tokenizer is not None:
            t = r.text
            bert = LDMBertModel(vocab_size=len(self.tokenizer), max_position_embeddings=t.max_length,
                                encoder_layers=t.layers, encoder_ffn_dim=t.ffn_dim, encoder_attention_heads=t.heads,
                                head_dim=t.head_dim, d_model=t.d_model, dropout=t.dropout)
            bert.to_logits.requires_grad_(False)  # the masked-LM head: kept for the file layout, never used
            with quiet_tokenizer():
                self.empty_ids = self.tokenizer([""], max_length=t.max_length).input_ids
        embedder = None
        if r.conditioning == "class":
            embedder = ClassEmbedder(n_classes=len(self.class_names) + 1, embed_dim=r.classes.embed_dim,
                                     class_names=self.class_names)
            logger.info("%d classes (+ the null class): %s", len(self.class_names), ", ".join(self.class_names))
        self.denoiser = Denoiser(build_unet(r, self.channels, self.latent_size), bert, embedder)
        if r.init_from:
            init_denoiser(self.denoiser, r.init_from)
        self.wrapped = {"denoiser": self.denoiser}
        self.noise_scheduler = DDPMScheduler(**schedule_config(r.diffusion))
        self.train_data = self._dataset()

    def _tokenizer(self) -> LDMTokenizer:
        r, run = self.recipe, self.run
        if r.text.tokenizer:
            tok = LDMTokenizer.from_pretrained(r.text.tokenizer, model_max_length=r.text.max_length)
        else:
            # Trained once (by the main process) and kept with the run, so a resume reuses the same vocabulary.
            saved = run.output_dir / "tokenizer"
            if run.is_main and not (saved / "tokenizer.json").is_file():
                captions = [rec.caption for rec in self.records if rec.caption]
                tok = LDMTokenizer.train_from_captions(captions, vocab_size=r.text.vocab_size,
                                                       model_max_length=r.text.max_length)
                # Whole or not at all: a kill between its files would leave a vocabulary the resume trusts.
                partial = saved.with_name(".tokenizer.partial")
                shutil.rmtree(partial, ignore_errors=True)
                with removed_on_error(partial):
                    tok.save_pretrained(partial)
                commit_folder(partial, saved)
            run.barrier()
            tok = LDMTokenizer.from_pretrained(saved)
        long = sum(len(tok.tokenize(rec.caption or "")) > r.text.max_length - 2 for rec in self.records[:2000])
        if long:
            logger.warning("Some captions are longer than %d tokens and will be truncated (%d of the first %d).",
                           r.text.max_length, long, min(len(self.records), 2000))
        return tok

    def _dataset(self):
        r, run = self.recipe, self.run
        sr_scale = r.data.sr_scale if r.conditioning == "concat" else None
        if not r.data.latent_cache:
            return ImageDataset(self.records, r.data.resolution, r.seed, r.data.random_crop, r.data.random_flip,
                                sr_scale, r.data.degradation)
        if r.data.random_crop:
            logger.info("data.latent_cache stores the centre crop of each image: random_crop is off.")
        cache_root = Path(r.data.latent_cache_dir) if r.data.latent_cache_dir else None
        folder = build_cache(run, self.ae, Path(r.autoencoder), self.records, r.data.resolution,
                             r.data.random_flip, cache_root)
        if run.is_main:
            logger.info("Latent cache: %s", folder)
        return CachedLatentDataset(folder, self.records, r.seed, r.data.random_flip, sr_scale, r.data.degradation)

    def dataset(self):
        return self.train_data

    def optimizer_params(self):
        cfg = self.recipe.train
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return {"denoiser": (params, cfg.lr, cfg.adam_betas)}

    def ema_module(self) -> nn.Module:
        return self.denoiser

    def state_modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    # ---------------------------------------------------------------------------------------- training
    def _latents(self, batch: dict, rand: StepRandom, rows: torch.Tensor) -> torch.Tensor:
        """``z = E(x)`` (a posterior sample for the KL autoencoder), times the latent scale."""
        device = self.run.device
        if "moments" in batch:
            moments = batch["moments"].to(device)
        else:
            with torch.no_grad():
                images = self.run.images(batch["pixel_values"])
                moments = (self.ae.encode(images).latent_dist.parameters if isinstance(self.ae, AutoencoderKL)
                           else self.ae.encode(images).latents)
        moments = moments.float()
        if isinstance(self.ae, AutoencoderKL):
            mean, logvar = moments.chunk(2, dim=1)
            noise = rand.randn("posterior", mean.shape[1:], rows, device)
            latents = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        else:
            latents = moments
        return latents * self.scale

    def micro_step(self, batch, rand: StepRandom, rows, step):
        r, device = self.recipe, self.run.device
        latents = self._latents(batch, rand, rows)
        noise = rand.randn("noise", latents.shape[1:], rows, device)
        timesteps = rand.randint("timesteps", r.diffusion.num_train_timesteps, rows, device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # DDPM eq. 4
        if r.diffusion.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if self.run.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        kwargs = {}
        if r.conditioning == "text":
            with quiet_tokenizer():
                ids = self.tokenizer(batch["caption"], max_length=r.text.max_length).input_ids
            # Classifier-free guidance (Ho & Salimans 2022): sometimes train on the empty prompt, which is
            # exactly what the pipeline feeds as the unconditional input.
            drop = rand.rand("caption_dropout", rows) < r.text.caption_dropout
            ids[drop] = self.empty_ids
            kwargs["input_ids"] = ids.to(device)
        elif r.conditioning == "class":
            drop = rand.rand("class_dropout", rows) < r.classes.class_dropout
            kwargs["class_labels"] = drop_labels(batch["label"], drop, self.denoiser.embedder.null_class).to(device)
        elif r.conditioning == "concat":
            kwargs["concat"] = self.run.images(batch["lowres"])
        elif r.conditioning == "inpaint":
            masks = step_masks(rand, rows, r.data.resolution, r.masks, device)
            kwargs["concat"] = inpaint_condition(self.ae, self.run.images(batch["pixel_values"]), masks)
        prediction = self.wrapped["denoiser"](noisy, timesteps, **kwargs)
        loss = losses.diffusion_loss(prediction, target)
        return loss, {"loss": loss.detach()}

    # --------------------------------------------------------------------------------- samples, export
    def pipeline(self):
        scheduler = sampling_scheduler(self.recipe.diffusion)
        unet = self.denoiser.unet
        if self.recipe.conditioning == "text":
            return LDMTextToImagePipeline(vqvae=self.ae, bert=self.denoiser.bert, tokenizer=self.tokenizer,
                                          unet=unet, scheduler=scheduler)
        if self.recipe.conditioning == "class":
            return LDMClassConditionalPipeline(vqvae=self.ae, class_embedder=self.denoiser.embedder, unet=unet,
                                               scheduler=scheduler)
        if self.recipe.conditioning == "concat":
            return LDMSuperResolutionPipeline(vqvae=self.ae, unet=unet, scheduler=scheduler)
        if self.recipe.conditioning == "inpaint":
            return LDMInpaintPipeline(vqvae=self.ae, unet=unet, scheduler=scheduler)
        return LDMPipeline(vqvae=self.ae, unet=unet, scheduler=scheduler)

    def samples(self, step: int):
        s, r = self.recipe.sampling, self.recipe
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(r.seed)
        common = dict(num_inference_steps=s.num_inference_steps, eta=s.eta, generator=generator)
        if r.conditioning == "text":
            return pipe(s.prompts, guidance_scale=s.guidance_scale, **common).images, len(s.prompts)
        if r.conditioning == "none":
            return pipe(batch_size=s.num_images, **common).images, s.num_images
        if r.conditioning == "class":
            ids = class_ids(s.classes, self.class_names, s.num_images)
            return pipe(ids, guidance_scale=s.guidance_scale, **common).images, len(ids)
        if r.conditioning == "inpaint":
            return inpaint_grid(pipe, self.records, r, common)
        highres = first_images(self.records, r.data.resolution, s.num_images)
        lowres = [degrade(im, r.data.sr_scale, "bicubic", None) for im in highres]
        upscaled = pipe(image=lowres, **common).images
        nearest = [im.resize(highres[0].size, PIL.Image.NEAREST) for im in lowres]
        return nearest + upscaled + highres, len(highres)  # rows: input, output, original

    def export(self, folder: Path) -> None:
        self.denoiser.to(memory_format=torch.contiguous_format)
        self.ae.to(memory_format=torch.contiguous_format)
        self.pipeline().save_pretrained(folder)


def train_ldm(recipe: LDMRecipe, resume: str | None = None) -> Path:
    return train(LDMTask(recipe), recipe, resume)
