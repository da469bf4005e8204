"""The README's commands, read from its code blocks, and copies of the project to run them in.

Every command in a ```bash block of README.md must be run by a test: tests/test_readme*.py list each one
verbatim (RUN_BY), and test_every_readme_command_is_run_by_a_test fails on any other. The commands run as
written; where they name a Hub model, the copy holds a tiny model of that family under the same
relative path, which diffusers and transformers load as a local folder."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The only change a CPU needs: the GPU recipes launch with fp16, which a CPU refuses.
CPU_LAUNCH = "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"


def readme_commands(text: str | None = None) -> list[str]:
    """Every command in the README's ```bash blocks: continuation lines joined, comment lines dropped."""
    text = text if text is not None else (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def marked_command(marker: str) -> str:
    """The command in the ```bash block right after <!-- marker --> in README.md."""
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", (REPO / "README.md").read_text(), re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def project_copy(root: Path) -> Path:
    """A copy of the project as a new user has it: tracked files only, no models, datasets or outputs."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def place_model(source: Path, root: Path, hub_id: str) -> Path:
    """A tiny model at the relative path of a Hub id, so a command naming the id runs it offline."""
    target = root / hub_id
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target)
    return target
