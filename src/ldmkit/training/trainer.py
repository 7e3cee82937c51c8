"""The training loop shared by autoencoder and LDM runs.

The run itself (accelerator, processes, devices, precision, output folder) is set up by ``run.py``. Mixed
precision is torch.autocast driven by the recipe (not by ``accelerate launch --mixed_precision``), with a
gradient scaler for fp16. Gradient accumulation, clipping, the LR schedule, EMA, checkpoints, logs, sample
grids and the final export are done here; what differs between runs (models, losses, samples, export) comes
from a :class:`Task`. Everything the loop changes and a checkpoint keeps is one :class:`TrainState`.
What a signal, a full disk or a kill does to a run is faults.py's; checksums manifest.py's; the refusal of
a resume with a recipe that would change the results recipe_check.py's.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LDMKitError
from ..io import atomic_write_text
from ..models import ModelMixin
from ..utils import make_image_grid
from . import checkpoints
from .data import StepBatchSampler, make_loader
from .ema import EMA
from .faults import StopSignals, commit_folder, disk_errors, recover_folder, removed_on_error
from .metrics import MetricsLog, plot_loss_curve, save_png
from .recipe import Recipe, TrainConfig, to_yaml
from .recipe_check import RECIPE_FILE, check_recipe
from .run import Run, Task, start_run
from .step_random import StepRandom, step_seed

logger = logging.getLogger("ldmkit.training")

FINAL = "final"


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
    """One optimizer with its parameters and LR schedule (the autoencoder with a GAN has two)."""

    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


@dataclass
class TrainState:
    """What the loop carries from step to step and a checkpoint saves: the task's models, the optimizers with
    their LR schedules, the EMA, the fp16 gradient scaler and the step. The step is also the data position
    (the batch sampler and :class:`StepRandom` derive every draw from it and the seed); the per-process RNG
    states are saved beside it by :func:`checkpoints.save_checkpoint`. ``unreadable`` holds the images found
    broken so far, ``last_saved`` the step of the newest checkpoint (None before the first)."""

    run: Run
    task: Task
    slots: list[Slot]
    ema: EMA | None
    scaler: torch.amp.GradScaler | None
    metrics: MetricsLog
    step: int = 0
    unreadable: set[int] = field(default_factory=set)
    last_saved: int | None = None

    @property
    def cfg(self) -> TrainConfig:
        return self.run.recipe.train


@dataclass
class LogWindow:
    """The scalar logs of the steps since the last log record, and when the window opened."""

    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for key, value in logs.items():
            self.values.setdefault(key, []).append(value.detach().float())


def train(task: Task, recipe: Recipe, resume: str | None = None) -> Path:
    """Run ``task`` to ``train.max_steps`` (resuming if asked) and export; returns the exported folder."""
    run = start_run(recipe)
    if run.is_main:  # first: a kill between a re-save's two renames left the checkpoint set aside
        checkpoints.remove_partials(run.output_dir)
    run.barrier()
    resume_path, damaged = checkpoints.resolve_resume(run.output_dir, resume)
    if resume_path is not None:
        check_recipe(resume_path, recipe)  # before building anything
    with disk_errors("the run's files", run.output_dir):
        state = build_state(run, task)
        if resume_path is not None:
            _restore(state, resume_path)
        _prepare_output_dir(state, resumed=resume_path is not None, damaged=damaged)
        sampler, loader = _data(state)
        with StopSignals() as stop:  # SIGINT / SIGTERM: finish the step, save, stop (faults.py)
            _loop(state, sampler, loader, stop)
            return _finish(state, stop)


def build_state(run: Run, task: Task) -> TrainState:
    """Set the task up on the run's device(s) and make its optimizers, LR schedules, EMA and scaler (step 0)."""
    recipe, cfg = run.recipe, run.recipe.train
    # The same initial weights on every process (DDP also broadcasts rank 0's, but the EMA copy is made first).
    torch.manual_seed(recipe.seed)
    task.setup(run)
    for module in task.state_modules().values():
        module.to(run.device)
        if run.channels_last:
            module.to(memory_format=torch.channels_last)
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(module)
    names = list(task.wrapped)
    prepared = run.accelerator.prepare(*task.wrapped.values())
    task.wrapped = dict(zip(names, prepared if len(names) > 1 else [prepared]))
    # Per-process RNG for anything drawn outside StepRandom (e.g. dropout).
    torch.manual_seed(step_seed(recipe.seed, 0, f"process-{run.rank}"))

    slots = []
    for name, (params, lr, betas) in task.optimizer_params().items():
        optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        slots.append(Slot(name, params, optimizer, scheduler))
    ema = EMA(task.ema_module(), cfg.ema.decay) if cfg.ema.enabled else None
    scaler = torch.amp.GradScaler(run.device.type) if run.mixed_precision == "fp16" else None
    return TrainState(run, task, slots, ema, scaler, MetricsLog(run.output_dir / "metrics.jsonl"))


def _enable_gradient_checkpointing(module: nn.Module) -> None:
    """Checkpoint every trained network in ``module`` that supports it (the UNet, LDMBert, the autoencoder;
    not the discriminator). Set at every start, so a resumed run checkpoints as the first one did: it changes
    memory and time, never the numbers."""
    for network in module.modules():
        if isinstance(network, ModelMixin) and network._supports_gradient_checkpointing:
            network.enable_gradient_checkpointing()


def _prepare_output_dir(state: TrainState, resumed: bool, damaged: list[Path]) -> None:
    """Set damaged checkpoints aside, save the recipe, and cut the log back to the resumed step."""
    run = state.run
    if damaged:
        run.barrier()  # every process has read its checkpoint before one is renamed
    if run.is_main:
        checkpoints.set_aside_damaged(damaged)
        atomic_write_text(run.output_dir / "recipe.yaml", to_yaml(run.recipe))
        if resumed:
            state.metrics.truncate_after(state.step)
        elif state.metrics.path.exists():
            state.metrics.path.unlink()  # a fresh run in an old folder starts a fresh log
    run.barrier()


def _data(state: TrainState):
    """The batch sampler (from the state's step on) and the data loader."""
    run, cfg, recipe = state.run, state.cfg, state.run.recipe
    dataset = state.task.dataset()
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.gradient_accumulation_steps, run.world_size,
                               run.rank, recipe.seed, state.step, cfg.max_steps)
    loader = make_loader(dataset, sampler, recipe.data.num_workers)
    if run.is_main:
        logger.info("Training %s: %d images, batch %d (%d process(es) x %d micro-step(s) x %d), %s, steps %d -> %d",
                    type(state.task).__name__, len(dataset), cfg.batch_size, run.world_size,
                    cfg.gradient_accumulation_steps, sampler.micro,
                    "fp32" if run.mixed_precision == "no" else run.mixed_precision, state.step, cfg.max_steps)
    return sampler, loader


def _loop(state: TrainState, sampler: StepBatchSampler, loader, stop: StopSignals) -> None:
    cfg, run = state.cfg, state.run
    progress = _progress_bar(state.run, cfg, state.step)
    batches = iter(loader)
    window = LogWindow()
    try:
        while state.step < cfg.max_steps:
            _train_step(state, batches, sampler, window)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                _log(state, window, progress)
                window = LogWindow()
            progress.update(1)
            if state.step < cfg.max_steps:  # the last step's evaluation, samples and checkpoint are _finish's
                _periodic(state)
                if stop.requested(run.world_size):
                    stop.stop(state.step, _save_if_new(state))
    finally:
        progress.close()


def _train_step(state: TrainState, batches, sampler: StepBatchSampler, window: LogWindow) -> None:
    """One optimizer step: the micro-batches (gradients synchronised on the last), then EMA; step + 1."""
    run, task, cfg, step = state.run, state.task, state.cfg, state.step
    rand = StepRandom(run.recipe.seed, step, cfg.batch_size)
    for micro in range(cfg.gradient_accumulation_steps):
        batch = next(batches)
        state.unreadable.update(batch.pop("skipped", []))
        last = micro == cfg.gradient_accumulation_steps - 1
        with _no_sync(run.accelerator, task.wrapped.values(), enabled=not last), run.autocast():
            loss, logs = task.micro_step(batch, rand, sampler.rows(micro), step)
        loss = loss / cfg.gradient_accumulation_steps
        (state.scaler.scale(loss) if state.scaler else loss).backward()
        window.add(logs)
    _optimizer_step(state)
    task.after_step(step)
    if state.ema is not None:
        state.ema.update(task.ema_module())
    state.step += 1
    window.steps += 1


def _periodic(state: TrainState) -> None:
    cfg, step = state.cfg, state.step
    if cfg.eval_every and step % cfg.eval_every == 0:
        _evaluate(state)
    if cfg.sample_every and step % cfg.sample_every == 0:
        _sample(state)
    if step % cfg.checkpoint_every == 0:
        _save(state)


def _finish(state: TrainState, stop: StopSignals) -> Path:
    """Evaluate, sample and save at the last step, then export (EMA weights if the recipe says so)."""
    run = state.run
    _evaluate(state)
    _sample(state)
    saved = _save_if_new(state)
    if stop.requested(run.world_size):
        stop.stop(state.step, saved)
    final = run.output_dir / FINAL
    if run.is_main:
        _export(state, final)
        plot_loss_curve(state.metrics.records(), run.output_dir / "loss.png")
        if state.unreadable:
            logger.warning("%d unreadable image(s) were skipped during training (see the warnings above).",
                           len(state.unreadable))
        logger.info("Done: %s", final)
    run.barrier()
    return final


def _no_sync(accelerator, modules, enabled: bool):
    stack = contextlib.ExitStack()
    if enabled:
        for module in modules:
            stack.enter_context(accelerator.no_sync(module))
    return stack


def _optimizer_step(state: TrainState) -> None:
    scaler, max_grad_norm = state.scaler, state.cfg.max_grad_norm
    for slot in state.slots:
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
    gathered: list = [None] * run.world_size
    dist.all_gather_object(gathered, sorted(unreadable))
    return set().union(*gathered)


def _log(state: TrainState, window: LogWindow, progress) -> None:
    """Average the window's logs over the processes and append them to metrics.jsonl (a collective)."""
    run, cfg = state.run, state.cfg
    state.unreadable = _all_unreadable(run, state.unreadable)
    keys = sorted(window.values)
    local = torch.stack([torch.stack(window.values[k]).mean() for k in keys]).to(run.device)
    reduced = run.accelerator.reduce(local, reduction="sum") if run.world_size > 1 else local
    values = (reduced / run.world_size).tolist()
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    record = {"step": state.step, **{k: v for k, v in zip(keys, values)}}
    record["lr"] = state.slots[0].optimizer.param_groups[0]["lr"]
    record["images_per_s"] = cfg.batch_size * window.steps / elapsed
    record["unreadable_images"] = len(state.unreadable)
    record["time"] = time.time()
    if run.is_main:
        state.metrics.append(record)
        progress.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.1f}")


def _evaluate(state: TrainState) -> None:
    run = state.run
    if run.is_main:
        with _ema_weights(state), torch.no_grad(), run.autocast():
            results = state.task.evaluate()
        if results:
            state.metrics.append({"step": state.step, **results})
            logger.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
    run.barrier()


def _sample(state: TrainState) -> None:
    run = state.run
    if run.is_main:
        with _ema_weights(state), torch.no_grad(), run.autocast():
            images, columns = state.task.samples(state.step)
        if images:
            save_png(make_image_grid(images, cols=columns), run.output_dir / "samples" / f"step-{state.step:08d}.png")
    run.barrier()


@contextlib.contextmanager
def _ema_weights(state: TrainState):
    """The EMA module in eval mode, holding the averaged weights when the recipe exports them."""
    module = state.task.ema_module()
    was_training = module.training
    module.eval()
    try:
        if state.ema is not None and state.cfg.ema.export:
            with state.ema.swapped_in(module):
                yield
        else:
            yield
    finally:
        module.train(was_training)


def _export(state: TrainState, final: Path) -> None:
    partial = final.parent / f".{final.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    recover_folder(final)
    with removed_on_error(partial), _ema_weights(state):
        state.task.export(partial)
    commit_folder(partial, final)


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_if_new(state: TrainState) -> Path:
    """Save unless the newest checkpoint is of this step (decided alike on every process: saving is a
    collective); returns the checkpoint of this step."""
    if state.last_saved != state.step:
        _save(state)
    return checkpoints.checkpoint_dir(state.run.output_dir, state.step)


def _save(state: TrainState) -> None:
    """Write a checkpoint of ``state`` at its step (a collective: every process writes its RNG state)."""
    run, task, cfg = state.run, state.task, state.cfg
    payload = {"models": {name: m.state_dict() for name, m in task.state_modules().items()},
               "optimizers": {s.name: {"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict()}
                              for s in state.slots}}
    if state.ema is not None:
        payload["ema"] = state.ema.state_dict()
    if state.scaler is not None:
        payload["scaler"] = state.scaler.state_dict()
    meta = {"step": state.step, "samples_seen": state.step * cfg.batch_size, "batch_size": cfg.batch_size,
            "world_size": run.world_size, "seed": run.recipe.seed, "unreadable_images": sorted(state.unreadable)}
    checkpoints.save_checkpoint(run.output_dir, state.step, payload, meta, rank=run.rank, is_main=run.is_main,
                                barrier=run.barrier, keep_last=cfg.keep_last,
                                extra_text={RECIPE_FILE: to_yaml(run.recipe)})
    state.last_saved = state.step
    if run.is_main:
        plot_loss_curve(state.metrics.records(), run.output_dir / "loss.png")


def _restore(state: TrainState, path: Path) -> None:
    """Load the checkpoint at ``path`` into ``state`` (weights, optimizers, EMA, scaler, RNG, step)."""
    run = state.run
    names = ["models", "optimizers"] + (["ema"] if state.ema is not None else [])
    names += ["scaler"] if state.scaler is not None else []
    payload, meta, rng = checkpoints.load_checkpoint(path, names, run.rank)
    _load_models(state.task, payload["models"], path)
    for slot in state.slots:
        saved = payload["optimizers"].get(slot.name)
        if saved is None:
            raise LDMKitError(f"Checkpoint {path} has no optimizer state for {slot.name!r}.")
        slot.optimizer.load_state_dict(saved["optimizer"])
        slot.scheduler.load_state_dict(saved["scheduler"])
    if state.ema is not None:
        state.ema.load_state_dict(payload["ema"])
    if state.scaler is not None:
        state.scaler.load_state_dict(payload["scaler"])
    if rng is not None:
        checkpoints.set_rng_state(rng)
    # A changed batch size (or any key that changes the results) was refused by check_recipe.
    if run.is_main:
        logger.info("Resumed from %s (step %d).", path, meta["step"])
    state.step = state.last_saved = int(meta["step"])
    state.unreadable = set(meta.get("unreadable_images", []))


def _load_models(task: Task, weights: dict, path: Path) -> None:
    for name, module in task.state_modules().items():
        if name not in weights:
            raise LDMKitError(f"Checkpoint {path} has no weights for {name!r}: it comes from a different recipe.")
        try:
            module.load_state_dict(weights[name])
        except RuntimeError as e:
            raise LDMKitError(f"Checkpoint {path} does not fit this recipe's {name} ({str(e).splitlines()[0]}). "
                              "Resume with the recipe the run started with (saved in its recipe.yaml).") from None


# ---------------------------------------------------------------------------------------------- reporting


def _progress_bar(run: Run, cfg: TrainConfig, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                disable=not (run.is_main and cfg.progress_bar))
