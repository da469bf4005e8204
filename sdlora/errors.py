"""User-facing errors: one clear line, no traceback, a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with the user's input or environment that the user can fix; printed as one line."""


def run_cli(main: Callable[..., Any], *args: Any) -> None:
    """Run a script's main(); turn a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
