"""The HTTP routes: OpenAI's Images API (generations, edits, variations), ldmkit's upscale and job API
(ids, progress, server-sent events, cancel), /files, /v1/models, /health and /ready."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .errors import APIError, bad_request, too_large
from .images import b64, decode_upload
from .jobs import Job
from .params import Fields, JobSpec, common, generation_spec, parse_size, pick_model

POLL = 0.02  # seconds between checks of a job (and of the client's connection) while a request waits


def state(request: Request):
    return request.app.state.serve


def ready_state(request: Request):
    """The server state, once the models are loaded (else 503: still loading, or loading failed)."""
    serve = state(request)
    if not serve.models.ready.is_set():
        raise APIError(503, "The server is still loading its models; retry when GET /ready answers 200.", None,
                       "loading", {"Retry-After": "2"})
    if serve.models.error:
        raise APIError(503, f"A model failed to load ({serve.models.error}); fix --model and restart.", None,
                       "model_load_failed")
    return serve


async def json_fields(request: Request) -> Fields:
    body = await request.body()
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"The body is not valid JSON ({e}); send a JSON object.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"The body must be a JSON object, got {type(data).__name__}.", None, "invalid_json")
    return Fields(data)


async def form_fields(request: Request, serve) -> tuple[Fields, dict]:
    """A multipart form's text fields and its uploaded files (bytes), within the body limit."""
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=serve.config.max_body_bytes)
    except APIError:
        raise
    except Exception as e:  # starlette's multipart errors: a malformed form
        raise bad_request(f"The body is not a readable multipart form ({e}); send multipart/form-data with the "
                          "image as a file field.", None, "invalid_form") from None
    fields, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            fields[key] = value
        else:
            files[key.removesuffix("[]")] = await value.read()
    return Fields(fields, form=True), files


def images_body(request: Request, job: Job) -> dict:
    data = []
    for result in job.results:
        item = {"revised_prompt": None, "seed": result.seed}
        if job.spec.response_format == "b64_json":
            item["b64_json"] = b64(result.data)
        else:
            item["url"] = f"{str(request.base_url).rstrip('/')}/files/{result.name}"
        data.append(item)
    return {"created": int(job.created), "data": data, "model": job.spec.model, "job_id": job.id,
            "output_format": "png"}


async def run_and_wait(request: Request, serve, spec: JobSpec):
    """Queue the job and answer when it ends; a client that goes away cancels its job (freeing its slot)."""
    job = serve.queue.submit(spec)
    request.state.job_id = job.id
    while not job.done.is_set():
        if await request.is_disconnected():
            serve.queue.cancel(job)
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        await asyncio.sleep(POLL)
    if job.state != "succeeded":
        raise job.error
    return JSONResponse(images_body(request, job), headers={"X-Job-Id": job.id})


router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    serve = state(request)
    models = serve.models
    status = ("failed" if models.error else "ready") if models.ready.is_set() else "loading"
    if status == "ready" and not serve.queue.accepting:
        status = "draining"
    body = {"status": status, "models": models.status, "error": models.error}
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/v1/models")
async def list_models(request: Request):
    serve = ready_state(request)
    return {"object": "list", "data": [model_card(m) for m in serve.models.models.values()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    serve = ready_state(request)
    if model_id not in serve.models.models:
        raise APIError(404, f"The model {model_id!r} is not loaded; GET /v1/models lists the loaded ones.",
                       "model", "model_not_found")
    return model_card(serve.models.models[model_id])


def model_card(model) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "ldmkit", "kind": model.kind,
            "default_steps": model.default_steps}


@router.post("/v1/images/generations")
async def generations(request: Request):
    serve = ready_state(request)
    spec = generation_spec(await json_fields(request), serve.models, serve.config)
    return await run_and_wait(request, serve, spec)


def image_spec(fields: Fields, files: dict, serve, kind: str) -> JobSpec:
    """/v1/images/edits (inpaint), /v1/images/variations and /v1/images/upscale (super-resolution)."""
    config = serve.config
    model = pick_model(fields, serve.models, kind)
    if "image" not in files:
        raise bad_request("'image' is required: upload the image as a multipart file field.", "image",
                          "missing_required_parameter")
    image = decode_upload(files["image"], "image", config.max_upload_pixels)
    base = common(fields, model, config)
    if kind == "upscale":
        scale = getattr(model.pipe, "upscale_factor", 4)
        pixels = len(base["seeds"]) * image.width * image.height * scale * scale
        if pixels > config.max_pixels:
            raise too_large(f"{len(base['seeds'])} upscale(s) of a {image.width}x{image.height} image make {pixels} "
                            f"pixels, over this server's limit of {config.max_pixels} (--max-pixels); send a smaller "
                            "image or fewer n.", "image")
        return JobSpec(kind="upscale", images=[image.convert("RGB")], width=image.width * scale,
                       height=image.height * scale, prompt=fields.text("prompt"), **base)
    mask = edit_mask(image, files.get("mask"), config.max_upload_pixels)
    width, height = parse_size(Fields({"size": f"{image.width}x{image.height}"}), model, len(base["seeds"]), config)
    return JobSpec(kind="inpaint", images=[image.convert("RGB")], mask=mask, width=width, height=height,
                   prompt=fields.text("prompt", required=True), **base)


def edit_mask(image, data: bytes | None, max_pixels: int):
    """The repaint mask, white = repaint. OpenAI's convention is kept: where the mask (or, without one, the
    image) has an alpha channel, its transparent pixels are the ones to edit; an opaque grayscale mask is
    read as ldmkit's inpainting pipeline reads it."""
    source = image if data is None else decode_upload(data, "mask", max_pixels)
    if source.size != image.size:
        raise bad_request(f"'mask' is {source.width}x{source.height} but 'image' is {image.width}x{image.height}; "
                          "give a mask of the image's size.", "mask")
    if "A" in source.getbands() or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    if data is None:
        raise bad_request("'mask' is required when 'image' has no transparent pixels: upload a mask whose "
                          "transparent (or white) pixels mark what to repaint.", "mask", "missing_required_parameter")
    return source.convert("L")


async def image_route(request: Request, kind: str):
    serve = ready_state(request)
    fields, files = await form_fields(request, serve)
    return await run_and_wait(request, serve, image_spec(fields, files, serve, kind))


@router.post("/v1/images/edits")
async def edits(request: Request):
    return await image_route(request, "inpaint")


@router.post("/v1/images/variations")
async def variations(request: Request):
    return await image_route(request, "upscale")


@router.post("/v1/images/upscale")
async def upscale(request: Request):
    return await image_route(request, "upscale")
