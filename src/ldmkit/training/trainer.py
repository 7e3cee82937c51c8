"""The training loop shared by autoencoder and LDM runs.

accelerate provides the processes, the devices and the DistributedDataParallel wrapping (one GPU, many
GPUs, many machines, or CPU processes over gloo). Mixed precision is torch.autocast driven by the recipe
(not by ``accelerate launch --mixed_precision``), with a gradient scaler for fp16. Gradient accumulation,
clipping, the LR schedule, EMA, checkpoints, logs, sample grids and the final export are done here; what
differs between runs (models, losses, samples, export) comes from a :class:`Task`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LDMKitError
from ..io import atomic_write_text
from . import checkpoints
from .data import StepBatchSampler, make_loader
from .ema import EMA
from .metrics import MetricsLog, image_grid, plot_loss_curve, save_png
from .recipe import Recipe, TrainConfig, to_yaml
from .step_random import StepRandom, step_seed

logger = logging.getLogger("ldmkit.training")

FINAL = "final"


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


# ----------------------------------------------------------------------------------------------- the loop


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or a half-cosine down to ``min_lr_ratio``
    (Loshchilov & Hutter 2017, SGDR, without restarts)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Slot:
    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def train(task: Task, recipe: Recipe, resume: str | None = None) -> Path:
    """Run ``task`` to ``train.max_steps`` (resuming if asked) and export; returns the exported folder."""
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
    resume_path = checkpoints.resolve_resume(run.output_dir, resume)

    # The same initial weights on every process (DDP also broadcasts rank 0's, but the EMA copy is made first).
    torch.manual_seed(recipe.seed)
    task.setup(run)
    for module in task.state_modules().values():
        module.to(run.device)
        if channels_last:
            module.to(memory_format=torch.channels_last)
    names = list(task.wrapped)
    prepared = accelerator.prepare(*task.wrapped.values())
    task.wrapped = dict(zip(names, prepared if len(names) > 1 else [prepared]))
    # Per-process RNG for anything drawn outside StepRandom (e.g. dropout).
    torch.manual_seed(step_seed(recipe.seed, 0, f"process-{run.rank}"))

    slots = []
    for name, (params, lr, betas) in task.optimizer_params().items():
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        slots.append(Slot(name, params, optimizer, scheduler))
    ema = EMA(task.ema_module(), cfg.ema.decay) if cfg.ema.enabled else None
    scaler = torch.amp.GradScaler(run.device.type) if mixed == "fp16" else None

    start_step, unreadable, last_saved = 0, set(), None
    metrics = MetricsLog(run.output_dir / "metrics.jsonl")
    if resume_path is not None:
        start_step, unreadable = _restore(resume_path, task, slots, ema, scaler, run)
        last_saved = start_step
    if run.is_main:
        checkpoints.remove_partials(run.output_dir)
        atomic_write_text(run.output_dir / "recipe.yaml", to_yaml(recipe))
        if resume_path is not None:
            metrics.truncate_after(start_step)
        elif metrics.path.exists():
            metrics.path.unlink()  # a fresh run in an old folder starts a fresh log
    run.barrier()

    dataset = task.dataset()
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.gradient_accumulation_steps, run.world_size,
                               run.rank, recipe.seed, start_step, cfg.max_steps)
    loader = make_loader(dataset, sampler, recipe.data.num_workers)
    if run.is_main:
        logger.info("Training %s: %d images, batch %d (%d process(es) x %d micro-step(s) x %d), %s, steps %d -> %d",
                    type(task).__name__, len(dataset), cfg.batch_size, run.world_size,
                    cfg.gradient_accumulation_steps, sampler.micro, "fp32" if mixed == "no" else mixed,
                    start_step, cfg.max_steps)

    progress = _progress_bar(run, cfg, start_step)
    batches = iter(loader)
    window: dict[str, list[torch.Tensor]] = {}
    window_start, window_steps = time.perf_counter(), 0
    step = start_step
    try:
        while step < cfg.max_steps:
            rand = StepRandom(recipe.seed, step, cfg.batch_size)
            for micro in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                unreadable.update(batch.pop("skipped", []))
                last = micro == cfg.gradient_accumulation_steps - 1
                with _no_sync(accelerator, task.wrapped.values(), enabled=not last), run.autocast():
                    loss, logs = task.micro_step(batch, rand, sampler.rows(micro), step)
                loss = loss / cfg.gradient_accumulation_steps
                (scaler.scale(loss) if scaler else loss).backward()
                for key, value in logs.items():
                    window.setdefault(key, []).append(value.detach().float())
            _optimizer_step(slots, scaler, cfg.max_grad_norm)
            task.after_step(step)
            if ema is not None:
                ema.update(task.ema_module())
            step += 1
            window_steps += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                unreadable = _all_unreadable(run, unreadable)
                record = _log_record(run, window, step, slots, cfg, window_steps, window_start, len(unreadable))
                if run.is_main:
                    metrics.append(record)
                    progress.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")
                window, window_steps = {}, 0
                window_start = time.perf_counter()
            progress.update(1)
            periodic = step < cfg.max_steps
            if periodic and cfg.eval_every and step % cfg.eval_every == 0:
                _evaluate(run, task, ema, metrics, step)
            if periodic and cfg.sample_every and step % cfg.sample_every == 0:
                _sample(run, task, ema, step)
            if periodic and step % cfg.checkpoint_every == 0:
                _save(run, task, slots, ema, scaler, step, unreadable, metrics)
                last_saved = step
    finally:
        progress.close()

    _evaluate(run, task, ema, metrics, step)
    _sample(run, task, ema, step)
    if last_saved != step:  # decided alike on every process (saving is collective)
        _save(run, task, slots, ema, scaler, step, unreadable, metrics)
    final = run.output_dir / FINAL
    if run.is_main:
        _export(task, ema, cfg, final)
        plot_loss_curve(metrics.records(), run.output_dir / "loss.png")
        if unreadable:
            logger.warning("%d unreadable image(s) were skipped during training (see the warnings above).",
                           len(unreadable))
        logger.info("Done: %s", final)
    run.barrier()
    return final


def _no_sync(accelerator, modules, enabled: bool):
    stack = contextlib.ExitStack()
    if enabled:
        for module in modules:
            stack.enter_context(accelerator.no_sync(module))
    return stack


def _optimizer_step(slots: list[Slot], scaler, max_grad_norm: float | None) -> None:
    for slot in slots:
        # An optimizer whose parameters got no gradient this step (the discriminator before it starts) rests,
        # and so does its LR schedule, which then starts when the optimizer does.
        if all(p.grad is None for p in slot.params):
            continue
        if scaler is not None:
            scaler.unscale_(slot.optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(slot.params, max_grad_norm)
        if scaler is not None:
            scaler.step(slot.optimizer)
        else:
            slot.optimizer.step()
        slot.scheduler.step()
        slot.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()


def _all_unreadable(run: Run, unreadable: set[int]) -> set[int]:
    """The unreadable images any process has met (a collective: called at the same steps everywhere)."""
    if run.world_size == 1:
        return unreadable
    import torch.distributed as dist

    gathered: list = [None] * run.world_size
    dist.all_gather_object(gathered, sorted(unreadable))
    return set().union(*gathered)


def _log_record(run: Run, window, step, slots, cfg, window_steps, window_start, unreadable: int):
    keys = sorted(window)
    local = torch.stack([torch.stack(window[k]).mean() for k in keys]).to(run.device)
    reduced = run.accelerator.reduce(local, reduction="sum") if run.world_size > 1 else local
    values = (reduced / run.world_size).tolist()
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    record = {"step": step, **{k: v for k, v in zip(keys, values)}}
    record["lr"] = slots[0].optimizer.param_groups[0]["lr"]
    record["images_per_s"] = cfg.batch_size * window_steps / elapsed
    record["unreadable_images"] = unreadable
    record["time"] = time.time()
    return record


def _evaluate(run: Run, task: Task, ema: EMA | None, metrics: MetricsLog, step: int) -> None:
    if run.is_main:
        with _ema_weights(task, ema, run.recipe.train), torch.no_grad(), run.autocast():
            results = task.evaluate()
        if results:
            metrics.append({"step": step, **results})
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
    run.barrier()


def _sample(run: Run, task: Task, ema: EMA | None, step: int) -> None:
    if run.is_main:
        with _ema_weights(task, ema, run.recipe.train), torch.no_grad(), run.autocast():
            images, columns = task.samples(step)
        if images:
            save_png(image_grid(images, columns), run.output_dir / "samples" / f"step-{step:08d}.png")
    run.barrier()


@contextlib.contextmanager
def _ema_weights(task: Task, ema: EMA | None, cfg: TrainConfig):
    module = task.ema_module()
    was_training = module.training
    module.eval()
    try:
        if ema is not None and cfg.ema.export:
            with ema.swapped_in(module):
                yield
        else:
            yield
    finally:
        module.train(was_training)


def _export(task: Task, ema: EMA | None, cfg: TrainConfig, final: Path) -> None:
    partial = final.parent / f".{final.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    with _ema_weights(task, ema, cfg):
        task.export(partial)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


# ---------------------------------------------------------------------------------------------- checkpoints


def _save(run: Run, task: Task, slots, ema, scaler, step: int, unreadable: set[int], metrics: MetricsLog) -> None:
    payload = {"models": {name: m.state_dict() for name, m in task.state_modules().items()},
               "optimizers": {s.name: {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict()}
                              for s in slots}}
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    cfg = run.recipe.train
    state = {"step": step, "samples_seen": step * cfg.batch_size, "batch_size": cfg.batch_size,
             "world_size": run.world_size, "seed": run.recipe.seed, "unreadable_images": sorted(unreadable)}
    checkpoints.save_checkpoint(run.output_dir, step, payload, state, rank=run.rank, is_main=run.is_main,
                                barrier=run.barrier, keep_last=cfg.keep_last,
                                extra_text={"recipe.yaml": to_yaml(run.recipe)})
    if run.is_main:
        plot_loss_curve(metrics.records(), run.output_dir / "loss.png")


def _restore(path: Path, task: Task, slots, ema, scaler, run: Run) -> tuple[int, set[int]]:
    names = ["models", "optimizers"] + (["ema"] if ema is not None else []) + (["scaler"] if scaler else [])
    payload, state, rng = checkpoints.load_checkpoint(path, names, run.rank)
    for name, module in task.state_modules().items():
        if name not in payload["models"]:
            raise LDMKitError(f"Checkpoint {path} has no weights for {name!r}: it comes from a different recipe.")
        try:
            module.load_state_dict(payload["models"][name])
        except RuntimeError as e:
            raise LDMKitError(f"Checkpoint {path} does not fit this recipe's {name} ({str(e).splitlines()[0]}). "
                              "Resume with the recipe the run started with (saved in its recipe.yaml).") from None
    for slot in slots:
        saved = payload["optimizers"].get(slot.name)
        if saved is None:
            raise LDMKitError(f"Checkpoint {path} has no optimizer state for {slot.name!r}.")
        slot.optimizer.load_state_dict(saved["optimizer"])
        slot.scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.load_state_dict(payload["ema"])
    if scaler is not None:
        scaler.load_state_dict(payload["scaler"])
    if rng is not None:
        checkpoints.set_rng_state(rng)
    cfg = run.recipe.train
    if state.get("batch_size") != cfg.batch_size:
        logger.warning("Resuming with train.batch_size=%s, the checkpoint used %s: the data order continues "
                       "from step %d but differs from the original run's.", cfg.batch_size,
                       state.get("batch_size"), state["step"])
    if run.is_main:
        logger.info("Resumed from %s (step %d).", path, state["step"])
    return int(state["step"]), set(state.get("unreadable_images", []))


# ---------------------------------------------------------------------------------------------- reporting


def _setup_logging(run: Run) -> None:
    log = logging.getLogger("ldmkit")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    logging.getLogger("ldmkit.training").setLevel(logging.INFO if run.is_main else logging.WARNING)


def _progress_bar(run: Run, cfg: TrainConfig, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                disable=not (run.is_main and cfg.progress_bar))
