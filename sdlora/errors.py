"""User-facing errors: one clear line, no traceback, a non-zero exit."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's input or environment that the user can fix; printed as one line."""


def run_cli(main: Callable[..., Any], *args: Any) -> None:
    """Run a script's main(); turn a UserError into `error: ...` on stderr and exit status 2."""
    # train_text_to_image_lora.sh starts accelerate's launcher with Ctrl-C ignored, so that the launcher
    # waits for the training process to save its checkpoint instead of dying with a traceback of its own;
    # the scripts themselves take Ctrl-C again.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
