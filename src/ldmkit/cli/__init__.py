"""The ``ldmkit`` command line (``ldmkit = "ldmkit.cli:main"``, ``python -m ldmkit``).

One parser with one sub-command module each: ``generate`` (txt2img, upscale, info), ``sample``, ``inpaint``,
``train``, ``convert``, ``data`` and ``serve``. A user mistake (:class:`~ldmkit.errors.LDMKitError`) is one line
on stderr and exit status 2; an interrupt is exit status 130.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .. import __version__
from ..errors import LDMKitError
from ..io import Terminated, terminate_as_exception
from .batch import add_prompt_file_options
from .convert import add_convert_parser
from .data import add_data_parser
from .generate import EXAMPLES, add_generate_parsers, read_png_metadata
from .inpaint import add_inpaint_parser
from .sample import add_sample_parser
from .serve import add_serve_parser
from .train import add_train_parser


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as every other user mistake: one line on stderr (pointing at --help), exit status 2
    (argparse prints the whole usage block first; the sub-parsers are of this class too)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ldmkit", description="Latent diffusion models: generate, upscale, "
                                     "train, convert.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parsers(sub)
    add_prompt_file_options(sub.choices["txt2img"])  # --prompts, --batch-size (batch.py)
    add_sample_parser(sub)
    add_inpaint_parser(sub)
    add_train_parser(sub)
    add_convert_parser(sub)
    add_data_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C (KeyboardInterrupt) and SIGTERM (:class:`~ldmkit.io.Terminated`) are raised as
    exceptions, so that every atomic write removes its temporary file and nothing half-written stays."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        if main_thread:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            terminate_as_exception()
        return int(args.func(args) or 0)
    except LDMKitError as e:
        print(f"ldmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"ldmkit {args.command}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():  # called in-process (tests, a script): leave no handler behind
            signal.signal(sig, handler)


__all__ = ["build_parser", "main", "read_png_metadata"]
