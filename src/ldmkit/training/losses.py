"""Training losses: the first stage (KL / VQ autoencoder with a patch GAN) and the diffusion objective.

Normalisation: reconstruction terms are means over pixels. The KL term is the per-image KL summed over
latent elements, divided by the number of pixel values per image: the original LDM loss (sums over
pixels, mean over the batch) divided by a constant, so the published ``kl_weight`` (1e-6) and
``disc_weight`` (0.5) mean the same here, while the loss stays on a readable scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """``|x - D(E(x))|`` (or squared), averaged over pixels. No perceptual (LPIPS) term: its VGG weights cannot
    be had offline, and the first stage trains without it (with a blurrier result before the GAN starts)."""
    diff = reconstructions.float() - images.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, pixels_per_image: int) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` of the KL autoencoder's posterior (Rombach et al. 2022, sec. 3.1 and
    appendix G; Kingma & Welling 2014, appendix B), summed per image, averaged over the batch, divided by the
    pixel values per image (see the module note)."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    return kl.mean() / pixels_per_image


def vq_losses(latents: torch.Tensor, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codebook and commitment terms of VQGAN's eq. 4 (van den Oord et al. 2017, eq. 3):
    ``||sg[E(x)] - z_q||^2`` moves the codes, ``||sg[z_q] - E(x)||^2`` commits the encoder."""
    latents, quantized = latents.float(), quantized.float()
    codebook = F.mse_loss(quantized, latents.detach())
    commitment = F.mse_loss(latents, quantized.detach())
    return codebook, commitment


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss (Lim & Ye 2017), used by VQGAN's code in place of eq. 5's log loss:
    ``0.5 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])``."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial term ``-E[D(x_hat)]``."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4) -> torch.Tensor:
    """VQGAN eq. 7: ``lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta)`` at the decoder's last layer,
    clamped to [0, 1e4] and detached, so the GAN term never outweighs reconstruction by its raw scale."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + delta)
    return weight.clamp(0.0, 1e4).detach()


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1], measured on [0, 1]: ``10 log10(1 / MSE)``."""
    a = (images.float().clamp(-1, 1) + 1) / 2
    b = (reconstructions.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The LDM objective (Rombach et al. 2022, eq. 2; conditional form eq. 3):
    ``E ||eps - eps_theta(z_t, t, tau(y))||^2``, DDPM's simplified loss (Ho et al. 2020, eq. 14) on latents;
    with v-prediction the target is ``v = sqrt(a_t) eps - sqrt(1 - a_t) z_0`` (Salimans & Ho 2022)."""
    return F.mse_loss(prediction.float(), target.float())
