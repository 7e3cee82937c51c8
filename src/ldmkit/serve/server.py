"""Run the app under uvicorn with a draining shutdown: on SIGTERM (or Ctrl-C) new jobs get 503, admitted jobs
may finish within --drain-timeout, the rest are cancelled between steps, then the server exits with status
0. A second Ctrl-C exits at once."""

from __future__ import annotations

import logging
import threading

import uvicorn

from .app import create_app
from .config import ServeConfig

log = logging.getLogger("ldmkit.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain, self._draining = drain, False

    def handle_exit(self, sig, frame) -> None:
        # uvicorn would stop at once and re-raise the signal after shutdown (exit by signal); instead drain
        # the queue first and then stop normally.
        if self._draining:
            self.force_exit = True
            return
        self._draining = True
        log.info("signal %s: draining the queue, then stopping", sig)
        threading.Thread(target=self._drain_then_stop, name="ldmkit-drain", daemon=True).start()

    def _drain_then_stop(self) -> None:
        self._drain()
        self.should_exit = True


def make_server(config: ServeConfig, page: bool | None = None) -> DrainingServer:
    app = create_app(config, page)
    serve = app.state.serve
    uv = uvicorn.Config(app, host=config.host, port=config.port, access_log=False, log_level="warning",
                        timeout_graceful_shutdown=max(5, int(config.drain_timeout) + 5))
    return DrainingServer(uv, serve.drain)


def warn_if_exposed(config: ServeConfig) -> bool:
    if config.exposed and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it; give "
                    "--api-key (or LDMKIT_API_KEY)", config.host)
        return True
    return False


def serve_forever(config: ServeConfig) -> int:
    """Block serving ``config`` until stopped; the exit status."""
    warn_if_exposed(config)
    server = make_server(config)
    log.info("ldmkit serve on http://%s:%d (models: %s; preset %s; queue depth %d, batches of up to %d)",
             config.host, config.port, ", ".join(config.models), config.preset, config.queue_depth, config.max_batch)
    server.run()
    return 0
