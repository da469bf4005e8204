"""The README's commands are the ones that run: the main command end to end, and the test command in CI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_script
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    """The shell command in the ```bash block right after <!-- marker --> in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    assert readme_command("test-command") in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_main_command_runs_the_whole_workflow_offline(tmp_path):
    # A copy of the project as a new user has it: tracked files only, no tiny model, dataset or outputs yet.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    result = run_script(["bash", "-c", readme_command("main-command")], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "output" / "tiny-lora"
    assert (tmp_path / "models" / "tiny-sd" / "model_index.json").is_file()
    assert (tmp_path / "datasets" / "Text2Image_example" / "dataset_info.json").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-200"]
    assert len(list((out / "validation" / "step-200").glob("*.png"))) == 4
    images = sorted((tmp_path / "results").rglob("image_*.png"))
    assert len(images) == 4 and all(Image.open(p).size == (64, 64) for p in images)
    # The split that says where the time goes: training, not loading or validation, dominates.
    assert re.search(r"time: total [\d.]+s; load", result.stderr)
