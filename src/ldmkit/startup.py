"""Imported first by the package: run as the ``ldmkit`` command, a Ctrl-C (or SIGTERM) while torch and the
package are still importing exits with one line and status 130 (143) instead of a KeyboardInterrupt
traceback. ``cli.main`` installs the handlers the commands run with; a library import changes nothing."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

CLI_MODULES = ("ldmkit", "ldmkit.cli", "ldmkit.__main__", "ldmkit.cli.__main__")


def _run_as_cli(argv: list[str]) -> bool:
    """Whether the interpreter's own command line (``sys.orig_argv``) runs the ldmkit command: the ``ldmkit``
    script or ``python -m ldmkit`` (also what ``accelerate launch -m ldmkit`` starts)."""
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("-X", "-W"):  # options that take a value
            next(rest, None)
        elif arg == "-m" or (arg.startswith("-m") and len(arg) > 2):
            return (arg[2:] or next(rest, "")) in CLI_MODULES
        elif arg == "-c" or not arg.startswith("-"):
            return arg != "-c" and Path(arg).stem == "ldmkit"
    return False


def quiet_startup_interrupt() -> None:
    """Install the start-up handlers when the interpreter runs the ldmkit command (a script's ``import ldmkit``
    changes no handler)."""
    if not _run_as_cli(list(getattr(sys, "orig_argv", []))) or \
            threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        sys.stderr.write("ldmkit: interrupted while starting\n")
        sys.stderr.flush()
        # Not SystemExit: import machinery (torch's among it) may catch BaseException and carry on. Nothing is
        # written before cli.main replaces this handler, so there is nothing to clean up.
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


quiet_startup_interrupt()
