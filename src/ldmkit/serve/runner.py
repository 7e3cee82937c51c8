"""One dynamic batch on one model: the jobs' prompts (or input images) and per-image generators concatenated
into a single pipeline call, progress and cancellation through the step callback, then each job's PNGs
written. Each image has its own ``torch.Generator``, so its noise does not depend on its batch-mates."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LDMKitError
from .errors import JobCancelled, bad_request
from .images import png_bytes, save_png
from .models import LoadedModel, ModelSet


@dataclass
class ImageResult:
    seed: int
    name: str        # file name under the output folder (/files/<name>)
    data: bytes      # the PNG


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


class Progress:
    """The step callback of one batch: moves every job's step counter, and stops the pipeline between steps
    (JobCancelled) once every job of the batch is cancelled."""

    def __init__(self, jobs, offset: int = 0):
        self.jobs, self.offset = jobs, offset

    def __call__(self, pipe, i, t, tensors):
        for job in self.jobs:
            job.set_step(self.offset + i + 1)
        if all(job.cancel_requested for job in self.jobs):
            raise JobCancelled()
        return None


def _text2img(model: LoadedModel, jobs, spec) -> list:
    prompts, negatives, seeds = [], [], []
    for job in jobs:
        prompts += [job.spec.prompt] * job.spec.n
        negatives += [job.spec.negative_prompt or ""] * job.spec.n
        seeds += job.spec.seeds
    pipe = model.pipeline_for(spec.scheduler)
    kwargs = {**model.defaults, "num_inference_steps": spec.steps}
    with model.lock:
        return pipe(prompts, negative_prompt=negatives if any(negatives) else None, height=spec.height,
                    width=spec.width, guidance_scale=spec.guidance, generator=generators(seeds),
                    callback_on_step_end=Progress(jobs), **kwargs).images


def _upscale(model: LoadedModel, jobs, images: list, steps: int, sampler: str | None, offset: int) -> list:
    seeds = [s for job in jobs for s in job.spec.seeds]
    pipe = model.pipeline_for(sampler)
    kwargs = {**model.defaults, "num_inference_steps": steps}
    with model.lock:
        return pipe(images, generator=generators(seeds), callback_on_step_end=Progress(jobs, offset), **kwargs).images


def _inpaint(model: LoadedModel, jobs, spec) -> list:
    images = [im for job in jobs for im in job.spec.images * job.spec.n]
    masks = [job.spec.mask for job in jobs for _ in range(job.spec.n)]
    seeds = [s for job in jobs for s in job.spec.seeds]
    pipe = model.pipeline_for(spec.scheduler)
    kwargs = {**model.defaults, "num_inference_steps": spec.steps}
    with model.lock:
        return pipe(images, masks, generator=generators(seeds), callback_on_step_end=Progress(jobs), **kwargs).images


def run_images(models: ModelSet, jobs) -> list:
    """The batch's images, in job order (job.spec.n each)."""
    spec = jobs[0].spec
    model = models.models[spec.model]
    if spec.kind == "text2img":
        images = _text2img(model, jobs, spec)
        if spec.upscale_model:
            images = _upscale(models.models[spec.upscale_model], jobs, images, spec.upscale_steps, None, spec.steps)
        return images
    if spec.kind == "upscale":
        inputs = [im for job in jobs for im in job.spec.images * job.spec.n]
        return _upscale(model, jobs, inputs, spec.steps, spec.scheduler, 0)
    return _inpaint(model, jobs, spec)


def run_batch(models: ModelSet, jobs, output: Path) -> None:
    """Run, then finish each job: its PNGs written (atomically) unless it was cancelled meanwhile."""
    start = time.perf_counter()
    try:
        images = run_images(models, jobs)
    except JobCancelled:
        for job in jobs:
            job.finish_cancelled()
        return
    except LDMKitError as e:  # an input the checks let through but the pipeline refuses
        for job in jobs:
            job.finish_failed(bad_request(str(e)))
        return
    seconds = time.perf_counter() - start
    at = 0
    for job in jobs:
        mine, at = images[at:at + job.spec.n], at + job.spec.n
        if job.cancel_requested:
            job.finish_cancelled()
            continue
        results = []
        for index, (seed, image) in enumerate(zip(job.spec.seeds, mine)):
            data = png_bytes(image, job.spec.metadata(seed))
            results.append(ImageResult(seed, save_png(output, job.id, index, seed, data), data))
        job.finish_ok(results, seconds, len(jobs))
