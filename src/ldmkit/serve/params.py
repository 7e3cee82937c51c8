"""Request fields, checked into a :class:`JobSpec`: every bad value is a 400 (or 413 past a size limit) that
names the field and what it accepts; fields the server does not know are ignored, as OpenAI does."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from ..pipelines.presets import SAMPLERS
from .config import ServeConfig
from .errors import APIError, bad_request, too_large, unknown_model
from .models import LoadedModel, ModelSet, native_size, size_multiple

MAX_SEED = 2**63 - 1
MAX_PROMPT = 4000
FORMATS = ("url", "b64_json")
SIZE = re.compile(r"^\s*(\d{1,7})\s*[xX]\s*(\d{1,7})\s*$")
UPSCALE = 4  # the bundled super-resolution model's factor (reported by the pipeline where it knows)


@dataclass
class JobSpec:
    kind: str                   # "text2img", "upscale" or "inpaint"
    model: str
    seeds: list[int]
    steps: int
    width: int = 0
    height: int = 0
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance: float = 1.0
    scheduler: str | None = None
    upscale_model: str | None = None  # text2img followed by super-resolution
    upscale_steps: int = 0
    response_format: str = "url"
    user: str | None = None
    images: list = field(default_factory=list)  # upscale / inpaint inputs (PIL), one per request
    mask: object = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.upscale_steps if self.upscale_model else 0)

    def batch_key(self) -> tuple:
        """Requests with equal keys can run as one pipeline call (each image keeps its own generator)."""
        inputs = tuple(im.size for im in self.images)
        return (self.kind, self.model, self.width, self.height, self.steps, self.guidance, self.scheduler,
                self.upscale_model, self.upscale_steps, inputs, self.mask is not None)

    def metadata(self, seed: int) -> dict:
        meta = {"model": self.model, "prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": seed,
                "steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler, "kind": self.kind}
        if self.kind == "text2img":
            meta.update(height=self.height, width=self.width, upscale=self.upscale_model is not None)
        if self.upscale_model:
            meta.update(upscale_model=self.upscale_model, upscale_steps=self.upscale_steps)
        return meta


class Fields:
    """A request's fields, from JSON (typed values) or a multipart form (strings, converted here)."""

    def __init__(self, values: dict, form: bool = False):
        self.values, self.form = values, form

    def get(self, name, default=None):
        value = self.values.get(name)
        return default if value is None or (self.form and value == "") else value

    def text(self, name: str, required: bool = False, limit: int = MAX_PROMPT) -> str | None:
        value = self.get(name)
        if value is None:
            if required:
                raise bad_request(f"'{name}' is required: give a non-empty string.", name, "missing_required_parameter")
            return None
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string, got {type(value).__name__}.", name)
        if required and not value.strip():
            raise bad_request(f"'{name}' is empty: give a non-empty string.", name)
        if len(value) > limit:
            raise bad_request(f"'{name}' is {len(value)} characters long; the limit is {limit}.", name)
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if self.form and isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}\s*", value):
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"'{name}' must be a whole number from {low} to {high}, got {value!r}.", name)
        if not low <= value <= high:
            raise bad_request(f"'{name}' must be from {low} to {high}, got {value}.", name)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name)
        if value is None:
            return default
        if self.form and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad_request(f"'{name}' must be a number from {low} to {high}, got {value!r}.", name)
        if not low <= value <= high:
            raise bad_request(f"'{name}' must be from {low} to {high}, got {value}.", name)
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.get(name, False)
        if self.form and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be true or false, got {value!r}.", name)
        return value

    def choice(self, name: str, choices, default=None):
        value = self.get(name, default)
        if value is not None and value not in choices:
            raise bad_request(f"'{name}' must be one of {', '.join(choices)}; got {value!r}.", name)
        return value


def pick_model(fields: Fields, models: ModelSet, kind: str, param: str = "model") -> LoadedModel:
    """The requested model (404 if not loaded, 400 if it cannot do ``kind``), or the first one that can."""
    name = fields.get(param)
    fitting = models.of_kind(kind)
    if name is None:
        if not fitting:
            raise APIError(404, f"No {kind} model is loaded; start the server with --model NAME for a {kind} "
                           f"pipeline (loaded: {', '.join(models.names()) or 'none'}).", param, "model_not_found")
        return fitting[0]
    if not isinstance(name, str) or name not in models.models:
        raise unknown_model(name, models.names(), param)
    model = models.models[name]
    if model.kind != kind:
        others = ", ".join(m.name for m in fitting) or f"none loaded; start the server with a {kind} --model"
        raise bad_request(f"The model {name!r} is a {model.kind} model and cannot do {kind}; use {others}.", param,
                          "model_not_supported")
    return model


def parse_size(fields: Fields, model: LoadedModel, n: int, config: ServeConfig, scale: int = 1) -> tuple[int, int]:
    """``size`` "WxH" (default: the model's native size): sides multiples of the model's factor, and
    ``n x W x H x scale^2`` within --max-pixels (else 413)."""
    value, native = fields.get("size"), native_size(model)
    if value is None or value == "auto":
        if native is None:
            raise bad_request("This model has no native size: give 'size' as \"WxH\".", "size")
        width = height = native
    else:
        match = SIZE.match(value) if isinstance(value, str) else None
        if match is None:
            raise bad_request(f"'size' must be \"WIDTHxHEIGHT\" in pixels, e.g. \"{native or 256}x{native or 256}\"; "
                              f"got {value!r}.", "size")
        width, height = int(match.group(1)), int(match.group(2))
    multiple = size_multiple(model)
    if width < 1 or height < 1 or width % multiple or height % multiple:
        near = max(multiple, round(max(width, 1) / multiple) * multiple)
        raise bad_request(f"'size' {width}x{height}: width and height must be positive multiples of {multiple} "
                          f"for {model.name}; try \"{near}x{near}\".", "size")
    if n * width * height * scale * scale > config.max_pixels:
        raise too_large(f"{n} image(s) of {width * scale}x{height * scale} is {n * width * height * scale**2} pixels, "
                        f"over this server's limit of {config.max_pixels} per request (--max-pixels); ask for fewer "
                        "or smaller images.", "size")
    return width, height


def seeds(fields: Fields, n: int) -> list[int]:
    first = fields.integer("seed", None, 0, MAX_SEED - n + 1)
    if first is None:
        first = random.randrange(0, 2**31 - 1)
    return [first + i for i in range(n)]


def common(fields: Fields, model: LoadedModel, config: ServeConfig, n_default: int = 1) -> dict:
    """The fields every image route shares: n, seed, steps, scheduler, response_format, user."""
    n = fields.integer("n", n_default, 1, config.max_n)
    return {"model": model.name, "seeds": seeds(fields, n),
            "steps": fields.integer("steps", model.default_steps, 1, config.max_steps),
            "scheduler": fields.choice("scheduler", sorted(SAMPLERS)),
            "response_format": fields.choice("response_format", FORMATS, "url"),
            "user": fields.text("user", limit=256)}


def generation_spec(fields: Fields, models: ModelSet, config: ServeConfig) -> JobSpec:
    """/v1/images/generations and /v1/jobs: prompt, model, n, size, response_format, user, and ldmkit's
    negative_prompt, seed, steps, guidance_scale, scheduler, upscale (4x through a super-resolution model)."""
    prompt = fields.text("prompt", required=True)
    model = pick_model(fields, models, "text2img")
    base = common(fields, model, config)
    upscaler = pick_model(Fields({}), models, "upscale") if fields.flag("upscale") else None
    scale = getattr(upscaler.pipe, "upscale_factor", UPSCALE) if upscaler else 1
    width, height = parse_size(fields, model, len(base["seeds"]), config, scale)
    return JobSpec(kind="text2img", prompt=prompt, negative_prompt=fields.text("negative_prompt"), width=width,
                   height=height, guidance=fields.number("guidance_scale", 3.0, 0.0, 50.0),
                   upscale_model=upscaler.name if upscaler else None,
                   upscale_steps=fields.integer("upscale_steps", upscaler.default_steps, 1, config.max_steps)
                   if upscaler else 0, **base)
