"""Test hooks: a real SIGKILL at a named point of a training run, and a trace of what each process did.

Set SDLORA_KILL_AT="step:5" (just after optimizer step 5) or "save:6" (in the middle of writing
checkpoint 6). SDLORA_STOP_AT="step:5" stops the run after step 5 as Ctrl-C would (a checkpoint, then
exit), for tests that run the trainer inside their own process. SDLORA_FAIL_AT="final-save" makes that
write fail as a full disk would. Set SDLORA_TRACE_DIR to a folder and each process appends what it trained on (and other
facts tests check) to rank-<process>.jsonl there. Unset, as in every normal run, both do nothing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("SDLORA_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def stop_requested(step: int) -> bool:
    return os.environ.get("SDLORA_STOP_AT") == f"step:{step}"


def trace(rank: int, event: str, **data) -> None:
    folder = os.environ.get("SDLORA_TRACE_DIR")
    if folder:
        with open(Path(folder) / f"rank-{rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **data}) + "\n")


def maybe_fail(point: str) -> None:
    """SDLORA_FAIL_AT=<point> (e.g. "final-save"): the disk is full right there (tests of what a failed
    write leaves behind)."""
    if os.environ.get("SDLORA_FAIL_AT") == point:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")
