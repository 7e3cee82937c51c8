"""ldmkit's job API over the same queue: POST /v1/jobs answers a job id at once, GET gives its state and
progress (and its images once done), /events streams them as server-sent events, DELETE cancels that job
alone. Also /v1/queue (depth and bound) and /files (the output folder, nothing outside it)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from .errors import APIError
from .images import output_file
from .params import generation_spec
from .routes import images_body, json_fields, ready_state, state

router = APIRouter()
SSE_POLL = 0.05


def find_job(request: Request, job_id: str):
    job = state(request).queue.get(job_id)
    if job is None:
        raise APIError(404, f"No job {job_id!r} (finished jobs are kept for a while only); POST /v1/jobs to start "
                       "one.", "job_id", "job_not_found")
    return job


def job_body(request: Request, job) -> dict:
    body = job.snapshot()
    if job.state == "succeeded":
        body["result"] = images_body(request, job)
    return body


@router.post("/v1/jobs", status_code=202)
async def create_job(request: Request):
    serve = ready_state(request)
    job = serve.queue.submit(generation_spec(await json_fields(request), serve.models, serve.config))
    request.state.job_id = job.id
    return JSONResponse(job.snapshot(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs")
async def list_jobs(request: Request):
    jobs = list(state(request).queue.jobs.values())[-100:]
    return {"object": "list", "data": [job.snapshot() for job in jobs]}


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str):
    return job_body(request, find_job(request, job_id))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(request: Request, job_id: str):
    job = find_job(request, job_id)
    state(request).queue.cancel(job)
    request.state.job_id = job.id
    return job.snapshot()


@router.get("/v1/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str):
    job = find_job(request, job_id)

    async def stream():
        seen = -1
        while True:
            if job.version != seen:
                seen = job.version
                body = job_body(request, job)
                yield f"event: {'done' if job.terminal else 'progress'}\ndata: {json.dumps(body)}\n\n"
                if job.terminal:
                    return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/v1/queue")
async def queue_stats(request: Request):
    return state(request).queue.stats()


@router.get("/files/{name}")
async def files(request: Request, name: str):
    path = output_file(state(request).queue.output, name)
    if path is None:
        raise APIError(404, f"No file {name!r} in this server's outputs.", "name", "file_not_found")
    return FileResponse(path, media_type="image/png")
