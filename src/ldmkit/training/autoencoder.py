"""First-stage training: the KL or VQ autoencoder, with an optional patch discriminator (Rombach et al. 2022,
sec. 3.1 and appendix G, after VQGAN: Esser et al. 2021, sec. 3)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LDMKitError
from ..models import AutoencoderKL, VQModel
from ..models.discriminator import NLayerDiscriminator
from ..pipelines import DiffusionPipeline
from . import losses
from .data import ImageDataset, collate, scan_folder, split_holdout
from .recipe import AutoencoderRecipe
from .run import Run, Task
from .step_random import StepRandom
from .trainer import train

logger = logging.getLogger("ldmkit.training")

EVAL_BATCH = 8
MAX_EVAL_IMAGES = 256      # the PSNR estimate is steady well before this
SCALE_ESTIMATE_IMAGES = 64


def build_autoencoder(recipe: AutoencoderRecipe) -> AutoencoderKL | VQModel:
    m = recipe.model
    levels = len(m.block_out_channels)
    common = dict(in_channels=3, out_channels=3, block_out_channels=list(m.block_out_channels),
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  layers_per_block=m.layers_per_block, latent_channels=m.latent_channels,
                  norm_num_groups=m.norm_num_groups, sample_size=recipe.data.resolution,
                  mid_block_add_attention=m.mid_block_add_attention)
    cls = AutoencoderKL if m.type == "kl" else VQModel
    if m.type == "kl":
        model = AutoencoderKL(**common, scaling_factor=m.scaling_factor or 0.18215)
    else:
        model = VQModel(**common, num_vq_embeddings=m.num_vq_embeddings, vq_embed_dim=m.vq_embed_dim,
                        scaling_factor=m.scaling_factor or 1.0)
    if m.init_from:
        folder = Path(m.init_from)
        if not (folder / "config.json").is_file():
            raise LDMKitError(f"model.init_from {folder} is not a saved {cls.__name__} folder (no config.json).")
        pretrained = cls.from_pretrained(folder)
        model = cls.from_config(pretrained.config)
        model.load_state_dict(pretrained.state_dict())
    return model


class KLForward(nn.Module):
    """What DDP wraps for the KL autoencoder: encode, sample the posterior with the given noise, decode."""

    def __init__(self, model: AutoencoderKL):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        posterior = self.model.encode(images).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.model.decode(z).sample, posterior.mean, posterior.logvar


class VQForward(nn.Module):
    """What DDP wraps for the VQ autoencoder: encode, quantise (straight-through), decode."""

    def __init__(self, model: VQModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        latents = self.model.encode(images).latents
        quantized, indices = quantize(self.model, latents)
        straight_through = latents + (quantized - latents).detach()
        decoded = self.model.decoder(self.model.post_quant_conv(straight_through))
        return decoded, latents, quantized, indices


class DiscriminatorForward(nn.Module):
    """What DDP wraps for the discriminator: real and fake logits in one call (DDP allows one forward per
    backward), in two passes so that batch-norm statistics stay per kind, as in VQGAN."""

    def __init__(self, disc: NLayerDiscriminator):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.disc(real), self.disc(fake)


def quantize(model: VQModel, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entries ``(B, C, H, W)`` (differentiable w.r.t. the codebook) and their indices."""
    codebook = model.quantize.embedding.weight
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
    distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.float().t() + codebook.float().pow(2).sum(1)
    indices = distances.argmin(dim=1)
    b, c, h, w = latents.shape
    quantized = model.quantize.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2).to(latents.dtype)
    return quantized, indices


class CodebookEMA(nn.Module):
    """Codebook learnt as moving averages instead of by gradient (van den Oord et al. 2017, appendix A.1):
    ``N_i <- g N_i + (1-g) n_i``, ``m_i <- g m_i + (1-g) sum_j z_ij``, ``e_i = m_i / N_i`` (Laplace-smoothed
    counts). Statistics are summed over all processes first, so every process keeps the same codebook.

    Codes whose average use ``N_i`` falls below ``restart_threshold`` are restarted at encoder outputs of the
    current batch (as Jukebox and SoundStream do): without it most codes are never picked, and a 3-dimensional
    codebook with a few dozen live codes cannot reconstruct colours (measured: 1.4 % of 1024 codes in use after
    250 steps on the emoji). The draw is seeded by the update count, so a resumed run restarts the same way."""

    def __init__(self, codebook: torch.Tensor, decay: float, eps: float = 1e-5, restart_threshold: float = 0.0,
                 initial_count: float = 0.0):
        super().__init__()
        self.decay = decay
        self.eps = eps
        self.restart_threshold = restart_threshold
        # A trained codebook (fine-tuning) starts as if each code had been used once a step, so the first
        # averages move it a little; from 0 the first update would scale the codes by ~1 / (1 - decay).
        self.register_buffer("cluster_size", torch.full((codebook.shape[0],), float(initial_count)))
        self.register_buffer("embed_sum", codebook.detach().clone().float() * max(initial_count, 1.0))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._counts: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        self._latents: torch.Tensor | None = None

    def accumulate(self, latents: torch.Tensor, indices: torch.Tensor) -> None:
        flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        onehot = torch.zeros(flat.shape[0], self.cluster_size.shape[0], device=flat.device)
        onehot.scatter_(1, indices[:, None], 1.0)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        self._counts = counts if self._counts is None else self._counts + counts
        self._sums = sums if self._sums is None else self._sums + sums
        self._latents = flat

    @torch.no_grad()
    def update(self, codebook: nn.Parameter) -> None:
        if self._counts is None:
            return
        counts, sums = self._counts, self._sums
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.num_updates += 1
        if self.restart_threshold > 0:
            self._restart_dead_codes(distributed)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.cluster_size.numel() * self.eps) * n
        codebook.data.copy_((self.embed_sum / smoothed[:, None]).to(codebook.dtype))
        self._counts = self._sums = self._latents = None

    def _restart_dead_codes(self, distributed: bool) -> None:
        dead = (self.cluster_size < self.restart_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return
        gen = torch.Generator().manual_seed(int(self.num_updates))
        pick = torch.randint(0, self._latents.shape[0], (dead.numel(),), generator=gen)
        chosen = self._latents[pick.to(self._latents.device)].contiguous()
        if distributed:  # every process takes rank 0's vectors, so the codebooks stay equal
            dist.broadcast(chosen, src=0)
        # A restarted code counts as used once, so it gets a few hundred steps to attract vectors.
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = chosen


class AutoencoderTask(Task):
    def __init__(self, recipe: AutoencoderRecipe):
        self.recipe = recipe
        self.wrapped = {}

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, run: Run) -> None:
        r = self.recipe
        self.run = run
        folder = scan_folder(r.data.root, r.data.caption_column, r.data.caption_template)
        train_records, held = split_holdout(folder.records, r.data.holdout, r.seed)
        if not held:
            logger.warning("data.holdout is 0: PSNR is measured on training images, not held-out ones.")
            held = train_records[:EVAL_BATCH]
        self.train_data = ImageDataset(train_records, r.data.resolution, r.seed, r.data.random_crop,
                                       r.data.random_flip, crop_size=r.data.crop_size)
        self.eval_data = ImageDataset(held[:MAX_EVAL_IMAGES], r.data.resolution, r.seed, random_crop=False,
                                      random_flip=False)
        self.model = build_autoencoder(r)
        self.is_kl = isinstance(self.model, AutoencoderKL)
        self.forward_module = KLForward(self.model) if self.is_kl else VQForward(self.model)
        self.codebook_ema = None
        if not self.is_kl and r.loss.codebook == "ema":
            self.model.quantize.embedding.weight.requires_grad_(False)  # moved by averages, not by Adam
            self.codebook_ema = CodebookEMA(self.model.quantize.embedding.weight, r.loss.codebook_ema_decay,
                                            restart_threshold=r.loss.codebook_restart_threshold,
                                            initial_count=1.0 if r.model.init_from else 0.0)
        self.disc = None
        self.wrapped = {"autoencoder": self.forward_module}
        if r.loss.disc_start is not None:
            self.disc = NLayerDiscriminator(3, r.loss.disc_channels, r.loss.disc_layers, r.loss.disc_norm)
            self.wrapped["discriminator"] = DiscriminatorForward(self.disc)

    def dataset(self):
        return self.train_data

    def optimizer_params(self):
        cfg = self.recipe.train
        out = {"autoencoder": ([p for p in self.model.parameters() if p.requires_grad], cfg.lr, cfg.adam_betas)}
        if self.disc is not None:
            out["discriminator"] = (list(self.disc.parameters()), self.recipe.loss.disc_lr or cfg.lr, cfg.adam_betas)
        return out

    def ema_module(self) -> nn.Module:
        return self.model

    def state_modules(self) -> dict[str, nn.Module]:
        out = {"autoencoder": self.model}
        if self.disc is not None:
            out["discriminator"] = self.disc
        if self.codebook_ema is not None:
            out["codebook_ema"] = self.codebook_ema
        return out

    # ---------------------------------------------------------------------------------------- training
    def micro_step(self, batch, rand: StepRandom, rows, step):
        r, run = self.recipe, self.run
        images = run.images(batch["pixel_values"])
        logs = {}
        if self.is_kl:
            config = self.model.config  # (model.init_from may bring its own shape)
            factor = 2 ** (len(config.block_out_channels) - 1)
            latent_shape = (config.latent_channels, images.shape[-2] // factor, images.shape[-1] // factor)
            noise = rand.randn("posterior", latent_shape, rows, run.device)
            recon, mean, logvar = self.wrapped["autoencoder"](images, noise)
            rec = losses.reconstruction_loss(images, recon, r.loss.reconstruction)
            kl = losses.kl_loss(mean, logvar, images[0].numel())
            loss = rec + r.loss.kl_weight * kl
            logs.update(rec=rec.detach(), kl=kl.detach())
        else:
            recon, latents, quantized, indices = self.wrapped["autoencoder"](images)
            rec = losses.reconstruction_loss(images, recon, r.loss.reconstruction)
            codebook, commitment = losses.vq_losses(latents, quantized)
            loss = rec + r.loss.commitment_weight * commitment
            if self.codebook_ema is None:
                loss = loss + r.loss.codebook_weight * codebook
            else:
                self.codebook_ema.accumulate(latents, indices)
            usage = torch.unique(indices).numel() / self.model.config.num_vq_embeddings
            logs.update(rec=rec.detach(), codebook=codebook.detach(), commitment=commitment.detach(),
                        codebook_usage=torch.tensor(usage))
        logs["psnr_train"] = losses.psnr(images, recon.detach()).mean()

        if self.disc is not None and step >= r.loss.disc_start:
            loss = loss + self._adversarial(images, recon, rec, logs)
        return loss, {"loss": loss.detach(), **logs}

    def _adversarial(self, images, recon, rec, logs) -> torch.Tensor:
        """The generator term with VQGAN's adaptive weight, plus the discriminator's own hinge loss (on
        detached reconstructions, so the two gradients never mix)."""
        disc = self.disc
        disc.requires_grad_(False)  # the generator's term must not move the discriminator
        g_loss = losses.generator_loss(disc(recon))
        disc.requires_grad_(True)
        last_layer = self.model.decoder.conv_out.weight
        weight = losses.adaptive_weight(rec, g_loss, last_layer) * self.recipe.loss.disc_weight
        d_loss = losses.hinge_d_loss(*self.wrapped["discriminator"](images.detach(), recon.detach()))
        logs.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), d_weight=weight)
        return weight * g_loss + d_loss

    def after_step(self, step: int) -> None:
        if self.codebook_ema is not None:
            self.codebook_ema.update(self.model.quantize.embedding.weight)

    # ------------------------------------------------------------------------------------- evaluation
    def _eval_batches(self):
        for start in range(0, len(self.eval_data), EVAL_BATCH):
            items = [self.eval_data[(i, 0)] for i in range(start, min(start + EVAL_BATCH, len(self.eval_data)))]
            yield self.run.images(collate(items)["pixel_values"])

    def _reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        if self.is_kl:
            return self.model.decode(self.model.encode(images).latent_dist.mode()).sample
        return self.model(images).sample

    def evaluate(self) -> dict[str, float]:
        scores = [losses.psnr(images, self._reconstruct(images)) for images in self._eval_batches()]
        return {"psnr_heldout": torch.cat(scores).mean().item()}

    def samples(self, step: int):
        images = next(iter(self._eval_batches()))[:8]
        recon = self._reconstruct(images)
        pairs = torch.cat([images, recon.float().clamp(-1, 1)])
        pil = DiffusionPipeline.numpy_to_pil((pairs.float().cpu().permute(0, 2, 3, 1).numpy() + 1) / 2)
        return pil, len(images)  # originals on top, reconstructions below

    # ------------------------------------------------------------------------------------------ export
    @torch.no_grad()
    def estimate_scaling_factor(self) -> float:
        """``1 / std`` of the latents, so that the diffusion model sees unit variance (Rombach et al. 2022,
        sec. 4.3.2 and appendix D.1: "rescale the latent by the component-wise standard deviation")."""
        latents = []
        count = min(len(self.train_data), SCALE_ESTIMATE_IMAGES)
        for start in range(0, count, EVAL_BATCH):
            keys = [(i, 0) for i in range(start, min(start + EVAL_BATCH, count))]
            images = self.run.images(collate([self.train_data[k] for k in keys])["pixel_values"])
            with self.run.autocast():
                posterior = self.model.encode(images).latent_dist
                latents.append(posterior.sample(generator=torch.Generator().manual_seed(start)).float())
        return float(1.0 / torch.cat(latents).flatten().std().clamp_min(1e-6))

    def export(self, folder: Path) -> None:
        m = self.recipe.model
        if m.scaling_factor is not None:
            scale = m.scaling_factor
        else:
            scale = self.estimate_scaling_factor() if self.is_kl else 1.0
        logger.info("Latent scaling factor: %.5g", scale)
        model = type(self.model).from_config({**self.model.config, "scaling_factor": scale})
        model.load_state_dict({k: v.detach().float().cpu() for k, v in self.model.state_dict().items()})
        model.save_pretrained(folder)


def train_autoencoder(recipe: AutoencoderRecipe, resume: str | None = None) -> Path:
    return train(AutoencoderTask(recipe), recipe, resume)
