"""The pipelines the server holds: each loaded once, configured by the preset, and run by one worker at a
time (its lock), so that a request's own sampler never changes a pipeline another request is using."""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field

from .. import schedulers
from ..errors import LDMKitError
from ..pipelines import DiffusionPipeline
from ..pipelines.presets import SAMPLERS, apply_preset, get_preset, load_pipeline, pick_device
from .config import ServeConfig

log = logging.getLogger("ldmkit.serve")

# pipeline class -> what the server does with it
KINDS = {"LDMTextToImagePipeline": "text2img", "LDMSuperResolutionPipeline": "upscale",
         "LDMInpaintPipeline": "inpaint"}
# the CLI's defaults for a model without a preset step count (exact)
DEFAULT_STEPS = {"text2img": 50, "upscale": 50, "inpaint": 50}


@dataclass
class LoadedModel:
    name: str
    pipe: DiffusionPipeline
    kind: str
    defaults: dict                 # __call__ keyword defaults from the preset
    model_scheduler: object        # the scheduler the model shipped with (a request's sampler is built from it)
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def default_steps(self) -> int:
        return int(self.defaults.get("num_inference_steps", DEFAULT_STEPS[self.kind]))

    def pipeline_for(self, sampler: str | None) -> DiffusionPipeline:
        """A shallow copy of the pipeline (same networks) with a scheduler of its own: the named sampler built
        from the model's scheduler config, or a fresh copy of the preset's. Schedulers keep per-run state
        (timesteps, step index), so no two runs share one."""
        pipe = copy.copy(self.pipe)
        if sampler is None:
            pipe.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        else:
            class_name, overrides = SAMPLERS[sampler]
            pipe.scheduler = getattr(schedulers, class_name).from_config(self.model_scheduler.config, **overrides)
        return pipe


def load_model(name: str, config: ServeConfig) -> LoadedModel:
    """Load ``name`` (folder, Hub id or bundled ldmkit:NAME) on the configured device and dtype."""
    # Loaded straight into the dtype ("auto": per network, ldmkit.hardware), as the CLI's --fast / --exact.
    pipe = load_pipeline(name, pick_device(config.device), config.dtype or get_preset(config.preset).dtype)
    kind = KINDS.get(type(pipe).__name__)
    if kind is None:
        raise LDMKitError(f"--model {name} is a {type(pipe).__name__}; the server runs text-to-image, "
                          "super-resolution and inpainting pipelines. Give one of those.")
    pipe.set_progress_bar_config(disable=True)
    model_scheduler = pipe.scheduler
    defaults = apply_preset(pipe, config.preset)
    return LoadedModel(name, pipe, kind, defaults, model_scheduler)


class ModelSet:
    """The models by name, loaded in order (``load_all``, run at startup in the background so that /health
    answers at once and /ready tells when loading is done)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.models: dict[str, LoadedModel] = {}
        self.status: dict[str, str] = {name: "pending" for name in config.models}
        self.error: str | None = None
        self.ready = threading.Event()

    def load_all(self) -> None:
        try:
            for name in self.config.models:
                self.status[name] = "loading"
                start = time.perf_counter()
                log.info("loading model %s", name)
                self.models[name] = load_model(name, self.config)
                self.status[name] = "loaded"
                log.info("loaded model %s (%s) in %.1f s", name, self.models[name].kind, time.perf_counter() - start)
        except Exception as e:  # reported by /ready and the startup log; the server stays up to say so
            self.error = f"{name}: {e}"
            self.status[name] = "failed"
            log.error("cannot load model %s: %s", name, e)
        finally:
            self.ready.set()

    def names(self) -> list[str]:
        return list(self.models)

    def of_kind(self, kind: str) -> list[LoadedModel]:
        return [m for m in self.models.values() if m.kind == kind]


def size_multiple(model: LoadedModel) -> int:
    """Image sides must be multiples of this: the first stage's factor times the UNet's downsampling."""
    pipe = model.pipe
    factor = getattr(pipe, "vae_scale_factor", 1) if model.kind != "upscale" else 1
    return factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def native_size(model: LoadedModel) -> int | None:
    sample = model.pipe.unet.config.sample_size
    if not isinstance(sample, int):
        return None
    return sample * (model.pipe.vae_scale_factor if model.kind == "text2img" else 1)
