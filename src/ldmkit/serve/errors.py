"""Errors in the OpenAI API's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status
codes the official client maps to its typed exceptions (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 413, 429 RateLimitError, 503 InternalServerError)."""

from __future__ import annotations

from ..errors import LDMKitError

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
         500: "server_error", 503: "server_error"}


class APIError(LDMKitError):
    """A request the server refuses (or a job that failed), answered with ``status`` and OpenAI's body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param, "request_too_large")


def unknown_model(name: object, loaded: list[str], param: str = "model") -> APIError:
    return APIError(404, f"The model {name!r} is not loaded. Loaded: {', '.join(loaded)}; start the server with "
                    f"--model {name} to serve it.", param, "model_not_found")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down and takes no new jobs; retry on another instance or after "
                    "it restarts.", None, "shutting_down")


class JobCancelled(Exception):
    """Raised from the step callback to stop a batch whose jobs were all cancelled (between steps)."""
