"""Helpers shared by the captioning tests: generate_captions.py run in this process, and broken images."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def caption(*argv: str) -> Result:
    """`python generate_captions.py ARGV` in this process: the same parse_args, main() and exit codes,
    without the seconds of imports a new process costs."""
    import generate_captions as script
    from sdlora.errors import run_cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(script.main, script.parse_args(list(argv)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_command(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command in a subprocess from the repository root, offline (for the CLI end to end)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def add_bad_images(images_dir: Path) -> set[str]:
    """A file that is not an image and a truncated PNG in images_dir; returns their names."""
    (images_dir / "x.png").write_text("not an image", encoding="utf-8")
    png = next(images_dir.glob("*.png")).read_bytes()
    (images_dir / "nested").mkdir(exist_ok=True)
    (images_dir / "nested" / "truncated.png").write_bytes(png[: len(png) // 2])
    return {"x.png", "truncated.png"}


# A caption a user wrote by hand: resuming must keep it exactly, odd spacing and characters included.
HAND_WRITTEN = "my  own caption, ^_^ caf\u00e9 "
