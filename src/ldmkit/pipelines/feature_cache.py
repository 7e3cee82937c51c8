"""Feature reuse between denoising steps: DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models
for Free", CVPR 2024).

Adjacent steps of the reverse process change the UNet's deep (low-resolution) features little. On a *full*
step the whole UNet runs and the hidden state entering up block ``L - branch`` (the skip branch ``branch``
levels from the top) is kept; on the steps in between only the shallow path runs: the stem, the first
``branch`` down levels (for their skips), the cached deep feature, the last ``branch`` up levels and the
head. The deep levels, the mid block and their attention are skipped.

It is installed as a hook of the one denoising loop (``pipe.predict_wrappers``), which marks each step full
or shallow, and a partial-forward hook on the UNet; no pipeline's own code takes part. A full step keeps one
feature per UNet call, in call order, so a step that calls the UNet more than once (the tiles of the tiled
super-resolution pipeline) gives each call of a shallow step the feature of its own call on the full step,
not the last tile's. Each feature covers the call's whole batch (both classifier-free guidance halves); a
call whose input shape or dtype differs from its full-step call's (e.g. leaving a guidance interval halves
the batch) runs in full again.
"""

from __future__ import annotations

import math

import torch

from ..errors import LDMKitError
from ..models.embeddings import embed_time_and_class
from ..models.unet_common import denoise

SCHEDULES = ("uniform", "quadratic")


def full_steps(num_steps: int, interval: int, schedule: str = "uniform") -> list[int]:
    """The step indices that run the whole UNet: ``ceil(num_steps / interval)`` of them.

    ``uniform``: every ``interval``-th step from the first (DeepCache's 1:N). ``quadratic``: the same number,
    placed at ``(num_steps - 1) (k / K)^2``, denser at the start of sampling (high noise), where the
    measured deep-feature change per step is largest on the emoji model (benchmarks/bench_emoji_quality.py);
    collisions are filled with the midpoints of the widest gaps so the budget is the same as uniform's.
    """
    count = math.ceil(num_steps / interval)
    if schedule == "uniform":
        return list(range(0, num_steps, interval))
    if schedule != "quadratic":
        raise LDMKitError(f"feature cache schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}.")
    chosen = sorted({round((num_steps - 1) * (k / count) ** 2) for k in range(count)})
    while len(chosen) < count:  # rounding merged some: fill the widest gap
        bounds = chosen + [num_steps]
        gap, start = max((bounds[j + 1] - bounds[j], bounds[j]) for j in range(len(chosen)))
        chosen = sorted({*chosen, start + gap // 2})
    return chosen


class FeatureCache:
    """The state of one pipeline's cache; see the module docstring. ``calls`` counts (full, shallow) runs."""

    def __init__(self, unet, interval: int, branch: int, schedule: str):
        levels = len(unet.up_blocks)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise LDMKitError(f"feature cache interval must be an integer >= 1 (1 = no reuse), got {interval!r}.")
        if not isinstance(branch, int) or isinstance(branch, bool) or not 1 <= branch <= levels:
            raise LDMKitError(f"feature cache branch must be an integer in 1..{levels} (the number of shallow "
                              f"UNet levels this model has that still run), got {branch!r}.")
        full_steps(interval, interval, schedule)  # validates the schedule name
        self.unet, self.interval, self.branch, self.schedule = unet, interval, branch, schedule
        self.full = True
        # The last full step's (input shape, dtype, deep feature) per UNet call; the step being run fills
        # ``keep`` (None outside a full step of a cached loop), ``slot`` counts this step's calls.
        self.cached: list[tuple[torch.Size, torch.dtype, torch.Tensor]] = []
        self.keep: list | None = None
        self.slot = 0
        self.calls = {"full": 0, "shallow": 0}

    def wrapper(self, predict, timesteps):
        """The loop hook: marks each step full or shallow (by its index in this call's schedule)."""
        plan = set(full_steps(len(timesteps), self.interval, self.schedule))
        state = {"i": 0}
        self.cached = []

        def cached_predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.begin_step(state["i"] in plan)
            state["i"] += 1
            try:
                return predict(latents, t)
            finally:
                self.end_step()
                if state["i"] == len(timesteps):  # the call is over: later UNet calls run in full
                    self.full, self.cached = True, []

        return cached_predict

    def begin_step(self, full: bool) -> None:
        """A step starts: a full one records each UNet call's deep feature, a shallow one reuses them."""
        self.full, self.slot, self.keep = full, 0, [] if full else None

    def end_step(self) -> None:
        if self.keep is not None:
            self.cached, self.keep = self.keep, None

    def forward(self, unet, sample: torch.Tensor, timestep, class_labels, *context) -> torch.Tensor:
        """The UNet's output, whole or by the shallow path (called from the UNet's forward)."""
        slot, self.slot = self.slot, self.slot + 1
        entry = self.cached[slot] if not self.full and slot < len(self.cached) else None
        if entry is None or entry[0] != sample.shape or entry[1] != sample.dtype:
            self.calls["full"] += 1
            return self._full(unet, sample, timestep, class_labels, *context)
        self.calls["shallow"] += 1
        return self._shallow(unet, entry[2], sample, timestep, class_labels, *context)

    def _stem(self, unet, sample, timestep, class_labels):
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = embed_time_and_class(unet, timestep, class_labels, sample.shape[0], sample)
        return unet.conv_in(sample), emb

    def _full(self, unet, sample, timestep, class_labels, *context) -> torch.Tensor:
        # The same computation as unet_common.denoise, keeping the feature entering up block L - branch.
        first = len(unet.up_blocks) - self.branch
        if first == 0 and unet.mid_block is None:
            return denoise(unet, sample, timestep, class_labels, *context)
        hidden_states, emb = self._stem(unet, sample, timestep, class_labels)
        skips = [hidden_states]
        for block in unet.down_blocks:
            hidden_states, block_skips = block(hidden_states, emb, *context)
            skips.extend(block_skips)
        if unet.mid_block is not None:
            hidden_states = unet.mid_block(hidden_states, emb, *context)
        for j, block in enumerate(unet.up_blocks):
            if j == first and self.keep is not None:
                self.keep.append((sample.shape, sample.dtype, hidden_states))
            hidden_states = block(hidden_states, skips, emb, *context)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden_states)))

    def _shallow(self, unet, deep, sample, timestep, class_labels, *context) -> torch.Tensor:
        first = len(unet.up_blocks) - self.branch
        hidden_states, emb = self._stem(unet, sample, timestep, class_labels)
        skips = [hidden_states]
        for block in unet.down_blocks[: self.branch]:
            hidden_states, block_skips = block(hidden_states, emb, *context)
            skips.extend(block_skips)
        # The last shallow down level's downsampled output feeds the deep levels only: drop its skip.
        del skips[sum(len(block.resnets) for block in unet.up_blocks[first:]):]
        hidden_states = deep
        for block in unet.up_blocks[first:]:
            hidden_states = block(hidden_states, skips, emb, *context)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden_states)))


def enable(pipe, interval: int = 3, branch: int = 1, schedule: str = "uniform") -> FeatureCache:
    disable(pipe)
    cache = FeatureCache(pipe.unet, interval, branch, schedule)
    pipe.unet._feature_cache = cache
    pipe.predict_wrappers.append(cache.wrapper)
    pipe._feature_cache = cache
    return cache


def disable(pipe) -> None:
    cache = getattr(pipe, "_feature_cache", None)
    if cache is None:
        return
    pipe.predict_wrappers[:] = [w for w in pipe.predict_wrappers if getattr(w, "__self__", None) is not cache]
    cache.unet._feature_cache = None
    pipe._feature_cache = None
