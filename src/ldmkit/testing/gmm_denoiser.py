"""A Gaussian-mixture "dataset" whose perfect noise-prediction network is known in closed form.

Data: ``x_0 ~ sum_k w_k N(mu_k, Sigma_k)`` in ``R^D``, with ``Sigma_k = U_k diag(lam_k) U_k^T``.

Under the variance-preserving forward process ``x_t = a x_0 + s eps``, ``a = sqrt(alpha_bar_t)``,
``s = sqrt(1 - alpha_bar_t)`` (Ho et al. 2020, eq. 4), every component stays Gaussian:
``x_t | k ~ N(a mu_k, C_k)`` with ``C_k = a^2 Sigma_k + s^2 I``. The minimum-MSE noise prediction, what a
perfectly trained eps-network outputs, is

    eps*(x_t) = E[eps | x_t] = sum_k r_k(x_t) s C_k^{-1} (x_t - a mu_k),
    r_k(x_t)  = w_k N(x_t; a mu_k, C_k) / sum_j w_j N(x_t; a mu_j, C_j)          (posterior over components)

because ``eps = (x_t - a x_0) / s`` and, within a component, ``E[x_0 | x_t, k] = mu_k + a Sigma_k C_k^{-1}
(x_t - a mu_k)`` (the Gaussian conditional), so ``E[eps | x_t, k] = (I - a^2 Sigma_k C_k^{-1})(x_t - a mu_k) / s
= s C_k^{-1} (x_t - a mu_k)``. Equivalently ``eps* = -s grad log p_t(x_t)`` (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", eq. 7 and App. B). ``C_k^{-1} = U_k diag(1 / (a^2 lam_k + s^2)) U_k^T``,
so one evaluation is a few matrix products.

The deterministic samplers all discretise the probability-flow ODE, which in the variables
``x~ = x_t / a`` and ``sigma = s / a`` reads ``dx~/dsigma = eps*(x~ / sqrt(1 + sigma^2), sigma)`` (Song, Meng &
Ermon 2021, DDIM, eq. 14; Karras et al. 2022, eq. 4 with s(t) = 1); :func:`probability_flow_reference`
solves it to high accuracy with an adaptive 8th-order Runge-Kutta method, down to the lowest trained noise
level, and finishes with the x_0 prediction there, as the samplers do.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class GaussianMixture:
    """``weights`` (K,), ``means`` (K, D), ``eigvecs`` (K, D, D) (columns), ``eigvals`` (K, D); float64."""

    def __init__(self, weights, means, eigvecs, eigvals):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64)
        self.eigvals = torch.as_tensor(eigvals, dtype=torch.float64)

    @classmethod
    def random(cls, dim: int = 32, weights=(0.4, 0.3, 0.2, 0.1), mean_std: float = 0.7,
               var_range=(0.02, 0.4), seed: int = 0) -> GaussianMixture:
        """Unequal weights, means ``N(0, mean_std^2 I)``, random rotations, eigenvalues log-uniform in
        ``var_range``: separated, anisotropic components with overall scale about 1 (like scaled LDM latents)."""
        g = torch.Generator().manual_seed(seed)
        k = len(weights)
        means = torch.randn(k, dim, generator=g, dtype=torch.float64) * mean_std
        eigvecs = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))[0]
        lo, hi = math.log(var_range[0]), math.log(var_range[1])
        eigvals = torch.exp(lo + (hi - lo) * torch.rand(k, dim, generator=g, dtype=torch.float64))
        return cls(torch.tensor(weights, dtype=torch.float64) / sum(weights), means, eigvecs, eigvals)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact draws from the mixture."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scaled = z * self.eigvals[labels].sqrt()
        return self.means[labels] + torch.einsum("nij,nj->ni", self.eigvecs[labels], scaled)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """``sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T``."""
        sigmas = torch.einsum("kde,ke,kfe->kdf", self.eigvecs, self.eigvals, self.eigvecs)
        second = sigmas + torch.einsum("kd,ke->kde", self.means, self.means)
        m = self.mean()
        return torch.einsum("k,kde->de", self.weights, second) - torch.outer(m, m)

    def _component_terms(self, x: torch.Tensor, alpha_bar: float):
        """Posterior ``r_k(x_t)`` (N, K) and ``C_k^{-1} (x_t - a mu_k)`` (N, K, D)."""
        a, s2 = math.sqrt(alpha_bar), 1.0 - alpha_bar
        coords = torch.einsum("nkd,kde->nke", x[:, None, :] - a * self.means[None], self.eigvecs)
        var = a * a * self.eigvals + s2  # eigenvalues of C_k
        log_lik = -0.5 * ((coords**2 / var).sum(-1) + var.log().sum(-1))
        r = torch.softmax(self.weights.log() + log_lik, dim=1)
        return r, torch.einsum("nke,kde->nkd", coords / var, self.eigvecs)

    def eps(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The exact ``E[eps | x_t]`` for samples ``x`` (N, D) at noise level ``alpha_bar`` (formula above)."""
        r, whitened = self._component_terms(x, alpha_bar)
        return math.sqrt(1.0 - alpha_bar) * torch.einsum("nk,nkd->nd", r, whitened)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """``p(k | x_0)`` for clean samples; its average over exact samples is ``w`` exactly."""
        return self._component_terms(x, 1.0)[0]


def training_log_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``log sigma_t`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for the training steps."""
    a = alphas_cumprod.double().numpy()
    return 0.5 * np.log((1 - a) / a)


def sigma_of_timestep(t: float, log_sigmas: np.ndarray) -> float:
    """The noise level a network conditioned on (possibly fractional) timestep ``t`` is trained for:
    ``log sigma`` interpolated linearly between training steps (k-diffusion's ``DiscreteSchedule.t_to_sigma``,
    the inverse of the schedulers' ``sigma_to_t``)."""
    return float(np.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas)))


class ExactEpsModel:
    """An eps-prediction "network" ``model(x_t, t)`` that is exact for the mixture, counting its calls (NFE).

    ``x_t`` is in the variance-preserving scaling, as every scheduler hands it to the network (the sigma
    schedulers after ``scale_model_input``)."""

    def __init__(self, gmm: GaussianMixture, alphas_cumprod: torch.Tensor):
        self.gmm = gmm
        self.log_sigmas = training_log_sigmas(alphas_cumprod)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        sigma = sigma_of_timestep(float(t), self.log_sigmas)
        return self.gmm.eps(x, 1.0 / (1.0 + sigma * sigma))


def probability_flow_reference(gmm: GaussianMixture, noise: torch.Tensor, sigma_max: float, sigma_min: float,
                               tol: float = 1e-10) -> torch.Tensor:
    """What every sampler converges to as its steps shrink, for standard-normal ``noise`` taken as the
    variance-preserving ``x_T`` at ``sigma_max``: integrate ``dx~/dsigma = eps*(x~ / sqrt(1 + sigma^2), sigma)``
    from ``x~ = sqrt(1 + sigma_max^2) noise`` down to ``sigma_min`` with DOP853 (Hairer's 8th-order
    Dormand-Prince) at relative and absolute tolerance ``tol``, then take the x_0 prediction there,
    ``x~ - sigma_min eps*``.

    The last step is the one samplers take too: the network was trained down to ``sigma_min`` (t = 0) only,
    so every sampler ending at sigma = 0 finishes with that x_0 prediction (an Euler step to 0).
    """
    from scipy.integrate import solve_ivp

    shape = noise.shape

    def eps(x_tilde, sigma):
        return gmm.eps(x_tilde / math.sqrt(1.0 + sigma * sigma), 1.0 / (1.0 + sigma * sigma))

    def velocity(sigma, y):
        return eps(torch.from_numpy(y).view(shape), sigma).numpy().ravel()

    start = (noise.double() * math.sqrt(1.0 + sigma_max**2)).numpy().ravel()
    solution = solve_ivp(velocity, (sigma_max, sigma_min), start, method="DOP853", rtol=tol, atol=tol)
    if not solution.success:
        raise RuntimeError(f"reference ODE solve failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1]).view(shape)
    return end - sigma_min * eps(end, sigma_min)
