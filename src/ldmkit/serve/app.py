"""The FastAPI app: routes, OpenAI-shaped errors for everything (never a traceback in a body), and one ASGI
gate in front that checks the API key, bounds the request body and logs one line per request."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .config import ServeConfig
from .errors import APIError, too_large
from .jobs import JobQueue
from .models import ModelSet
from .page import mount_page
from .routes import router
from .routes_jobs import router as jobs_router

log = logging.getLogger("ldmkit.serve")
# Gradio reads this when imported: no usage reporting from a server that must work offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class ServeState:
    """What the routes and the page share: the settings, the models and the one queue."""

    def __init__(self, config: ServeConfig):
        self.config = config.check()
        self.config.output.mkdir(parents=True, exist_ok=True)
        self.models = ModelSet(self.config)
        self.queue = JobQueue(self.models, self.config)
        self._drained = threading.Lock()

    def load(self) -> None:
        self.models.load_all()
        self.queue.start()

    def drain(self) -> None:
        """Once (SIGTERM and the lifespan's end both call it)."""
        if self._drained.acquire(blocking=False):
            self.queue.drain(self.config.drain_timeout)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Gate:
    """Pure ASGI (so that request.is_disconnected() keeps working): auth on /v1, the body limit, the log."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    def refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_body_bytes:
            return too_large(f"The request body is {length} bytes; this server accepts at most "
                             f"{self.config.max_body_bytes} (--max-body-bytes).")
        key = self.config.api_key
        if key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                what = "No API key given" if not given else "The API key is wrong"
                return APIError(401, f"{what}: send 'Authorization: Bearer <key>' with the key the server was "
                                "started with (--api-key or LDMKIT_API_KEY).", None, "invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, seen = time.perf_counter(), [0], [0]
        scope.setdefault("state", {})

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def limited_receive():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.config.max_body_bytes:
                raise too_large(f"The request body is over {self.config.max_body_bytes} bytes (--max-body-bytes).")
            return message

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, logged_send)
            else:
                await self.app(scope, limited_receive, logged_send)
        finally:
            if not scope["path"].startswith(("/assets/", "/gradio_api/", "/theme.css", "/static/")):
                log.info("%s %s %d %.3fs job=%s", scope["method"], scope["path"], status[0],
                         time.perf_counter() - start, scope["state"].get("job_id", "-"))


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return error_response(APIError(400, f"Invalid request: {error.errors()[0].get('msg', 'bad value')}."))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = {404: f"No route {request.url.path}; see GET /v1/models and POST /v1/images/generations.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(error.status_code, error.detail)
        return error_response(APIError(error.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.exception("error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"Internal server error ({type(error).__name__}); see the server log."))


def create_app(config: ServeConfig, page: bool | None = None) -> FastAPI:
    """The app; models load in the background at startup (GET /ready says when they are in)."""
    serve = ServeState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=serve.load, name="ldmkit-load", daemon=True).start()
        yield
        serve.drain()

    app = FastAPI(title="ldmkit serve", lifespan=lifespan, docs_url="/v1/docs", redoc_url=None,
                  openapi_url="/v1/openapi.json")
    app.state.serve = serve
    add_error_handlers(app)
    app.include_router(router)
    app.include_router(jobs_router)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown_route(request: Request, rest: str):  # before the page, which takes every other path
        if any(route.path_regex.match(request.url.path) for route in (*router.routes, *jobs_router.routes)):
            raise APIError(405, f"{request.method} is not allowed on {request.url.path}.", None, "method_not_allowed")
        raise APIError(404, f"No route {request.url.path}; see GET /v1/models and POST /v1/images/generations.",
                       None, "unknown_route")

    if config.page if page is None else page:
        app = mount_page(app, serve)
    app.add_middleware(Gate, config=serve.config)
    return app
