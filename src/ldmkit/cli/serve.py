"""``ldmkit serve``: the OpenAI Images API and the web page (``ldmkit.serve``; needs the ``serve`` extra)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import LDMKitError
from ..loading.bundled import DEFAULT_SUPERRES, DEFAULT_TEXT2IMG
from ..serve.config import ServeConfig, api_key_from_env

try:  # FastAPI, uvicorn and Gradio come with `pip install 'ldmkit[serve]'`; the rest of the CLI runs without
    from ..serve.server import serve_forever
except ImportError as e:
    if e.name not in ("fastapi", "uvicorn", "starlette", "gradio", "multipart", "python_multipart"):
        raise
    serve_forever, MISSING = None, e.name
else:
    MISSING = None

SERVE_EXAMPLES = """examples:
  ldmkit serve                                    # bundled models, offline, http://127.0.0.1:7860
  ldmkit serve --model ldmkit:emoji-text2img --model CompVis/ldm-super-resolution-4x-openimages --port 8000 \\
      --api-key $KEY
"""


def cmd_serve(args) -> int:
    if serve_forever is None:
        raise LDMKitError(f"ldmkit serve needs the serve extra ({MISSING} is missing): pip install 'ldmkit[serve]'.")
    logging.getLogger("ldmkit.serve").setLevel(logging.INFO)
    config = ServeConfig(models=args.model or [DEFAULT_TEXT2IMG, DEFAULT_SUPERRES], host=args.host, port=args.port,
                         api_key=api_key_from_env(args.api_key), preset="exact" if args.exact else "fast",
                         device=args.device, dtype=args.dtype,
                         output=Path(args.output), queue_depth=args.queue_depth, max_batch=args.max_batch,
                         max_n=args.max_n, max_pixels=args.max_pixels, max_steps=args.max_steps,
                         max_body_bytes=args.max_body_bytes, max_upload_pixels=args.max_upload_pixels,
                         drain_timeout=args.drain_timeout, page=not args.no_page).check()
    return serve_forever(config)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible image API and web page", epilog=SERVE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ServeConfig()
    p.add_argument("--model", action="append", help="a model to load (repeat for several; default: the bundled "
                   f"{DEFAULT_TEXT2IMG} and {DEFAULT_SUPERRES})")
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' (default: $LDMKIT_API_KEY)")
    p.add_argument("--exact", action="store_true", help="the exact preset (fp32, the model's scheduler) instead of "
                   "the fast one")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights dtype (default: the preset's: auto for fast, fp32 for --exact)")
    p.add_argument("-o", "--output", default=str(d.output), help=f"folder for the PNGs (default {d.output})")
    for option, help_text in (("queue-depth", "jobs queued or running at once; more get 429"),
                              ("max-batch", "images per dynamic batch"), ("max-n", "images per request"),
                              ("max-pixels", "n x width x height per request; more get 413"),
                              ("max-steps", "denoising steps per request"),
                              ("max-body-bytes", "request body size; more get 413"),
                              ("max-upload-pixels", "decoded pixels of an uploaded image")):
        dest = option.replace("-", "_")
        p.add_argument(f"--{option}", dest=dest, type=int, default=getattr(d, dest),
                       help=f"{help_text} (default {getattr(d, dest)})")
    p.add_argument("--drain-timeout", dest="drain_timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, seconds running jobs may take before they are cancelled")
    p.add_argument("--no-page", dest="no_page", action="store_true", help="the API only, no web page at /")
    p.set_defaults(func=cmd_serve)
