"""What a training run is made of before the loop starts: the accelerator, the precision and memory layout,
the output folder (:class:`Run`), and what a kind of run supplies to the loop (:class:`Task`).

accelerate provides the processes, the devices and the DistributedDataParallel wrapping (one GPU, many
GPUs, many machines, or CPU processes over gloo); it is imported when a run starts (:func:`make_accelerator`),
so the rest of ldmkit, and the ``ldmkit`` command line, import without the training extra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LDMKitError
from .recipe import Recipe, TrainConfig
from .step_random import StepRandom

# ------------------------------------------------------------------------------------------ environment


def cpu_supports_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """"auto" -> bf16 where the hardware runs it natively (recent x86 CPUs, Ampere+ GPUs), fp16 on older
    GPUs, fp32 ("no") otherwise."""
    if device_type == "cpu":
        if setting == "fp16":
            raise LDMKitError("train.mixed_precision=fp16 needs a GPU; on a CPU use bf16 (the default where the "
                              "CPU supports it) or no.")
        if setting == "auto":
            return "bf16" if cpu_supports_bf16() else "no"
        return setting
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LDMKitError("train.device=cuda but no CUDA GPU is available; use train.device=cpu or auto.")
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    # find_unused_parameters stays off (it costs a graph traversal per step): tasks freeze what they do not use.
    return Accelerator(mixed_precision="no", cpu=use_cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


@dataclass
class Run:
    """What a task can use: the accelerator, the device, process layout, precision and output folder."""

    recipe: Recipe
    accelerator: object
    output_dir: Path
    mixed_precision: str
    channels_last: bool

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Move an image batch to the device, in the memory layout the convolutions run fastest in."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Task:
    """What a kind of run supplies to the loop (see autoencoder.py and ldm.py)."""

    # Modules called through DDP in micro_step; filled by setup, replaced by their wrapped versions.
    wrapped: dict[str, nn.Module]

    def setup(self, run: Run) -> None:
        raise NotImplementedError

    def dataset(self):
        raise NotImplementedError

    def optimizer_params(self) -> dict[str, tuple[list[nn.Parameter], float, list[float]]]:
        """name -> (parameters, learning rate, Adam betas)."""
        raise NotImplementedError

    def ema_module(self) -> nn.Module:
        raise NotImplementedError

    def state_modules(self) -> dict[str, nn.Module]:
        """Everything whose state a checkpoint keeps (unwrapped modules)."""
        raise NotImplementedError

    def micro_step(self, batch: dict, rand: StepRandom, rows: torch.Tensor, step: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro-batch: the loss to back-propagate and scalar logs (``loss`` first)."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called on every process after the optimizers stepped (e.g. EMA codebook updates)."""

    def evaluate(self) -> dict[str, float]:
        return {}

    def samples(self, step: int) -> tuple[list, int]:
        """Images for the sample grid and the number of columns."""
        return [], 1

    def export(self, folder: Path) -> None:
        raise NotImplementedError


def start_run(recipe: Recipe) -> Run:
    """The accelerator, the precision and memory layout, the logging and the output folder of a run."""
    cfg = recipe.train
    accelerator = make_accelerator(cfg)
    mixed = resolve_mixed_precision(cfg.mixed_precision, accelerator.device.type)
    # channels_last by default only for GPU autocast: on CPU (bf16, 1-2 threads) it measured 20% slower than the
    # default layout (benchmarks/results/training.json), while bf16 itself is 2.4-2.7x faster than fp32.
    if cfg.channels_last is None:
        channels_last = mixed != "no" and accelerator.device.type == "cuda"
    else:
        channels_last = cfg.channels_last
    run = Run(recipe, accelerator, Path(recipe.output_dir), mixed, channels_last)
    _setup_logging(run)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    return run


def _setup_logging(run: Run) -> None:
    log = logging.getLogger("ldmkit")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    logging.getLogger("ldmkit.training").setLevel(logging.INFO if run.is_main else logging.WARNING)
