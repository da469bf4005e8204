"""sdlora.fileio: atomic outputs get the modes open() and mkdir() give, and check_writable tells a folder
that cannot take files (read-only, full) by a real write.

run_on_small_disk (used by test_cache.py and test_create_dataset.py too) gives a small tmpfs, full or
read-only, without root: a private user and mount namespace (`unshare`), as test_checkpoints.py does.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sdlora.errors import UserError
from sdlora.fileio import atomic_directory, atomic_file, atomic_write_text, check_writable

REPO = Path(__file__).resolve().parent.parent
# Python code run on the small disk starts with this: the repository and the tests importable, `root` the
# mounted folder, and fill() to leave no space on it.
PRELUDE = f"""
import sys
from pathlib import Path
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
root = Path(sys.argv[1])

def fill():
    try:
        with open(root / "filler", "wb") as f:
            f.write(bytes(64 * 2**20))
    except OSError:
        pass
"""


def run_on_small_disk(
    tmp_path: Path, code: str, options: str = "size=2m", extra: list[str] = (), timeout: int = 120
) -> subprocess.CompletedProcess:
    """Run Python `code` (after PRELUDE) with a fresh tmpfs mounted with `options` (size=2m, ro, ...) at
    `root` (sys.argv[1]; `extra` follow it), in a user and mount namespace of its own; skip where unshare
    or the mount is not allowed."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare to mount a small private tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        [
            *("unshare", "--user", "--map-root-user", "--mount", "sh", "-c"),
            'mount -t tmpfs -o "$1" tmpfs "$2" && m="$2" c="$3" && shift 3 && exec "$0" -c "$c" "$m" "$@"',
            *(sys.executable, options, str(mount), PRELUDE + code, *extra),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.stderr.startswith(("unshare:", "mount:")):
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()[:200]}")
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask-{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_outputs_get_the_modes_the_umask_gives(tmp_path, umask):
    """A LoRA or dataset copied for a web UI running as another user must be readable as open() would
    have made it (atomic writes made everything 0600 and 0700)."""
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    with atomic_file(tmp_path / "lora.safetensors") as tmp:
        tmp.write_bytes(b"weights")
    atomic_write_text(tmp_path / "args.json", "{}")
    with atomic_directory(tmp_path / "dataset") as tmp:
        (tmp / "state.json").write_text("{}")
        (tmp / "images").mkdir()
    with atomic_directory(tmp_path / "dataset", overwrite=True) as tmp:  # a replacement too
        (tmp / "state.json").write_text("{}")
    with atomic_directory(tmp_path / "new" / "dataset") as tmp:  # and the parents it makes
        pass
    assert mode(tmp_path / "lora.safetensors") == mode(tmp_path / "args.json") == file_mode
    assert mode(tmp_path / "dataset") == mode(tmp_path / "new" / "dataset") == folder_mode
    assert mode(tmp_path / "dataset" / "state.json") == file_mode
    with atomic_directory(tmp_path / "other") as tmp:
        (tmp / "images").mkdir()
    assert mode(tmp_path / "other" / "images") == folder_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "args.json",
        "dataset",
        "lora.safetensors",
        "new",
        "other",
    ]


def test_check_writable_passes_a_writable_folder_and_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    check_writable(tmp_path / "out", "--output_dir")
    check_writable(tmp_path / "missing" / "deeper", "--output_dir")  # made later: its parent is checked
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def test_check_writable_refuses_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match=r"out: not a folder; pass another --output_dir"):
        check_writable(tmp_path / "out", "--output_dir")


CHECK = """
from sdlora.errors import UserError
from sdlora.fileio import check_writable
{fill}
for folder in (root, root / "not-yet"):
    try:
        check_writable(folder, "--latents_cache_dir")
        print("writable", folder)
    except UserError as e:
        print("error:", e)
"""


@pytest.mark.parametrize(
    "options,fill,reason,hint",
    [
        ("ro,size=2m", "", "Read-only file system", ""),
        ("size=2m", "fill()", "No space left on device", "free some space or "),
    ],
    ids=["read-only", "full"],
)
def test_check_writable_refuses_a_read_only_or_full_disk_even_for_root(tmp_path, options, fill, reason, hint):
    """Tests run as root, which ignores permissions: only a real write tells."""
    result = run_on_small_disk(tmp_path, CHECK.format(fill=fill), options)
    lines = result.stdout.splitlines()
    disk = tmp_path / "disk"
    assert len(lines) == 2, result.stdout + result.stderr
    for line, folder in zip(lines, (disk, disk / "not-yet")):
        assert (
            line == f"error: {folder}: cannot write there ({reason}); {hint}pass another --latents_cache_dir"
        )
