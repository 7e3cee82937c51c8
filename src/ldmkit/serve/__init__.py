"""``ldmkit serve``: the OpenAI Images API and a web page over one bounded job queue, in one process.

The pieces, lowest first: :mod:`.config` (the settings), :mod:`.errors` (OpenAI-shaped errors),
:mod:`.models` (the loaded pipelines), :mod:`.params` (request fields checked into a job spec),
:mod:`.images` (upload decoding with size limits, PNG output), :mod:`.runner` (one batch on one pipeline),
:mod:`.jobs` (the queue, its workers and dynamic batching), :mod:`.routes` / :mod:`.app` (HTTP),
:mod:`.page` (the Gradio page) and :mod:`.server` (uvicorn with a draining SIGTERM). FastAPI, uvicorn and
Gradio come with the ``serve`` extra; only :mod:`.app`, :mod:`.routes`, :mod:`.page` and :mod:`.server`
import them.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
