"""The server's settings (what ``ldmkit serve`` options set), with the limits that keep one request from
taking the machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LDMKitError
from ..loading.bundled import DEFAULT_SUPERRES, DEFAULT_TEXT2IMG

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    models: list[str] = field(default_factory=lambda: [DEFAULT_TEXT2IMG, DEFAULT_SUPERRES])
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    preset: str = "fast"             # "exact" with --exact
    device: str = "auto"
    dtype: str | None = None         # None: the preset's
    output: Path = Path("outputs/serve")
    queue_depth: int = 16            # jobs admitted and not finished (queued + running)
    max_batch: int = 4               # images per dynamic batch
    max_n: int = 10                  # images per request (OpenAI's own bound)
    max_pixels: int = 4 * 512 * 512  # n x width x height of one request's output
    max_steps: int = 200
    max_body_bytes: int = 8 << 20    # a request body (JSON or multipart upload)
    max_upload_pixels: int = 1024 * 1024  # decoded size of one uploaded image (decompression bombs)
    drain_timeout: float = 30.0      # SIGTERM: seconds running jobs may take to finish before they are cancelled
    page: bool = True                # the Gradio page at /

    def check(self) -> ServeConfig:
        """Each setting in range, else an LDMKitError naming the option and the fix."""
        positive = {"--queue-depth": self.queue_depth, "--max-batch": self.max_batch, "--max-n": self.max_n,
                    "--max-pixels": self.max_pixels, "--max-steps": self.max_steps,
                    "--max-body-bytes": self.max_body_bytes, "--max-upload-pixels": self.max_upload_pixels}
        for option, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise LDMKitError(f"{option} must be a positive whole number, got {value!r}.")
        if not 0 <= self.port <= 65535:
            raise LDMKitError(f"--port {self.port} is not a TCP port; give one from 1 to 65535 (0: any free one).")
        if self.drain_timeout < 0:
            raise LDMKitError(f"--drain-timeout must be >= 0 seconds, got {self.drain_timeout}.")
        if not self.models:
            raise LDMKitError("no --model to serve; give at least one (e.g. --model ldmkit:emoji-text2img).")
        if len(set(self.models)) != len(self.models):
            raise LDMKitError("the same --model is given twice; give each model once.")
        self.output = Path(self.output)
        return self

    @property
    def exposed(self) -> bool:
        """Bound to an address other hosts can reach."""
        return self.host not in LOOPBACK


def api_key_from_env(given: str | None) -> str | None:
    """--api-key, else LDMKIT_API_KEY; an empty value means no key."""
    key = given if given is not None else os.environ.get("LDMKIT_API_KEY")
    return key or None
