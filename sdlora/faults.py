"""Fault injection for the crash-recovery tests: a real SIGKILL at a named point of a training run.

Set SDLORA_KILL_AT="step:5" (just after optimizer step 5) or "save:6" (in the middle of writing
checkpoint 6). Unset, as in every normal run, this does nothing.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("SDLORA_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
