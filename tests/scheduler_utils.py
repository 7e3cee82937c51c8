"""What the scheduler tests share: a fixed fake network, whole sampling loops, and the parity check against
diffusers 0.42.1 (same model outputs, same generator)."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

import ldmkit.schedulers as ls

ATOL = RTOL = 1e-5
C = 3


def fake_model(x: torch.Tensor, t, out_channels: int = C, positive_variance: bool = False) -> torch.Tensor:
    """A fixed random linear "network" eps = f(x, t), identical for both libraries."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(out_channels, x.shape[1], generator=g) * 0.3
    b = torch.randn(out_channels, 1, 1, generator=g) * 0.1
    tt = float(t) / 1000.0
    xf = x.float()
    out = torch.einsum("oc,bchw->bohw", w, xf) + b * (1 + tt) + 0.05 * torch.sin(xf * 3).sum(1, True)
    if out_channels > x.shape[1]:  # learned variance: second half in [-1, 1]
        v = out[:, x.shape[1]:]
        out[:, x.shape[1]:] = torch.sigmoid(v) * 1e-2 if positive_variance else torch.tanh(v)
    return out.to(x.dtype)


def trajectory(scheduler, steps: int, *, seed: int = 0, out_channels: int = C, set_kwargs=None,
               positive_variance: bool = False, **step_kwargs):
    """Run a whole sampling loop; return every step's (prev_sample, pred_original_sample)."""
    scheduler.set_timesteps(steps, **(set_kwargs or {}))
    x = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(42)) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = dict(step_kwargs, generator=gen)
    outs = []
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = fake_model(inp, t, out_channels, positive_variance)
        res = scheduler.step(eps, t, x, **step_kwargs)
        x = res.prev_sample
        outs.append((x, getattr(res, "pred_original_sample", None)))
    outs.append((x, None))
    return outs, [float(t) for t in scheduler.timesteps]


def assert_same_trajectory(ours, theirs):
    (a_out, a_ts), (b_out, b_ts) = ours, theirs
    assert a_ts == b_ts
    assert len(a_out) == len(b_out)
    for i, ((a, a0), (b, b0)) in enumerate(zip(a_out, b_out)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"step {i}: {m}")
        if a0 is not None and b0 is not None:
            torch.testing.assert_close(a0, b0, atol=ATOL, rtol=RTOL, msg=lambda m, i=i: f"x0, step {i}: {m}")
    assert torch.isfinite(a_out[-1][0]).all()


def compare(name, config, steps=6, step_kwargs=None, out_channels=C, set_kwargs=None):
    ours = getattr(ls, name)(**config)
    theirs = getattr(diffusers, name)(**config)
    step_kwargs = step_kwargs or {}
    kw = dict(out_channels=out_channels, set_kwargs=set_kwargs,
              positive_variance=config.get("variance_type") == "learned")
    a = trajectory(ours, steps, **kw, **step_kwargs)
    b = trajectory(theirs, steps, **kw, **step_kwargs)
    assert_same_trajectory(a, b)
    return ours, theirs


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

HAS_SCIPY = True
try:
    import scipy.stats  # noqa: F401
except ImportError:  # diffusers' LMSDiscreteScheduler and beta sigmas need scipy
    HAS_SCIPY = False
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="diffusers needs scipy for this")
