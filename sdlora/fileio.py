"""Atomic writes: a file or folder appears complete or not at all; and a real check that a folder is writable."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


def _temporary(parent: Path, name: str, create: Callable[[Path], None]) -> Path:
    """A new hidden path beside `name` in parent, made by `create`, which must fail if the path exists.

    Not tempfile.mkstemp/mkdtemp: they make files 0600 and folders 0700 whatever the umask, so a LoRA or
    dataset copied for a web UI running as another user could not be read. os.open and os.mkdir apply the
    umask (and a folder's default ACL) as open() and mkdir() do.
    """
    for _ in range(100):
        path = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            create(path)
            return path
        except FileExistsError:  # a name taken: draw another
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent / f".{name}.*.tmp"))


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; it becomes `path` (fsynced, renamed) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path.parent, path.name, _new_file)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gave a new file here
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # A writer that replaces the file instead of writing into it (safetensors' save_file makes its own,
        # 0600) would otherwise decide the mode.
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` only if the block succeeds.

    With overwrite, an existing `final` is replaced only after the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final.parent, final.name, lambda p: p.mkdir(0o777))
    try:
        yield tmp
        if final.exists() and overwrite:
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # fails if final exists and is not empty: never clobber silently
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: str | Path, flag: str) -> None:
    """UserError unless files can be written in `folder` (or, if it is not there yet, in the folder it will
    be made in), found by writing one: a read-only mount or a full disk shows only then, and root passes
    every permission check. `flag` is the option that named the folder, e.g. "--output_dir"."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # nothing is made here
    if not existing.is_dir():
        raise UserError(f"{existing}: not a folder; pass another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing) as f:  # (removed on close, even if never named)
            f.write(b"x")
            f.flush()
    except OSError as e:
        hint = "free some space or " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(
            f"{folder}: cannot write there ({e.strerror or e}); {hint}pass another {flag}"
        ) from None
