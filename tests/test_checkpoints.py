"""Checkpoints as units: any optimizer state (8-bit Adam's nested quantization state included) saved and
restored exactly without pickle, safe pruning, an earlier run's checkpoints never mixed in, full disks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora import checkpoints
from sdlora.errors import UserError


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # One tensor above bitsandbytes' 4096-element threshold (8-bit state), one below (32-bit state).
    return [
        torch.nn.Parameter(torch.randn(80, 80, generator=g)),
        torch.nn.Parameter(torch.randn(16, generator=g)),
    ]


def _optimizer(kind: str, params):
    groups = [{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 5e-3}]
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=0.01)
    return torch.optim.AdamW(groups, weight_decay=0.01, foreach=True)


def _steps(optimizer, params, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_optimizer_state_round_trips_exactly_through_safetensors_and_json(tmp_path, kind):
    params = _params()
    optimizer = _optimizer(kind, params)
    _steps(optimizer, params, 3, seed=1)
    if kind == "adamw8bit":
        assert "__bnb_optimizer_quant_state__" in optimizer.state_dict()["state"][0]  # the nested case
    tensors, meta = checkpoints._optimizer_to_files(optimizer.state_dict())
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "opt.safetensors"), metadata={"meta": json.dumps(meta)})
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = _optimizer(kind, restored_params)
    restored.load_state_dict(
        checkpoints._optimizer_from_files(load_file(str(tmp_path / "opt.safetensors")), meta)
    )
    # The same next steps from the restored state give bit-identical weights.
    _steps(optimizer, params, 2, seed=2)
    _steps(restored, restored_params, 2, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(params, restored_params))


def _fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / checkpoints.STATE_FILE).write_text("{}")
    return folder


def test_pruning_keeps_newest_by_step_ignores_strays_and_protects_resume_source(tmp_path):
    for step in (2, 10, 9, 100):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-7").mkdir()  # incomplete: no state file
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-50").write_text("a file, not a folder")
    (tmp_path / "notes").mkdir()
    _fake_checkpoint(tmp_path / ".checkpoint-11.abc.tmp")  # left by a killed save
    removed = checkpoints.prune_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in removed) == ["checkpoint-9"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "checkpoint-10",
        "checkpoint-100",
        "checkpoint-2",
        "checkpoint-50",
        "checkpoint-7",
        "checkpoint-best",
        "notes",
    ]


def test_an_earlier_runs_checkpoints_are_refused_unless_resuming_or_overwriting(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-5000")
    with pytest.raises(UserError, match="checkpoint-5000 from an earlier run.*--overwrite_output_dir"):
        checkpoints.find_earlier_run(tmp_path, "logs", resuming=False, overwrite=False)
    earlier = checkpoints.find_earlier_run(tmp_path, "logs", resuming=False, overwrite=True)
    assert earlier.checkpoints == [tmp_path / "checkpoint-5000"]
    assert (tmp_path / "checkpoint-5000").is_dir()  # deleted only when this run saves its first checkpoint
    assert checkpoints.find_earlier_run(tmp_path, "logs", resuming=True, overwrite=False).entries == []


def _save(folder: Path, step: int, lora_bytes: int = 1000):
    params = _params()
    optimizer = _optimizer("adamw", params)
    _steps(optimizer, params, 1, seed=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    write_lora = lambda f: (f / "pytorch_lora_weights.safetensors").write_bytes(b"x" * lora_bytes)  # noqa: E731
    return checkpoints.save_checkpoint(
        folder, step, write_lora, [], optimizer, scheduler, None, {"compat": {}}
    )


def test_a_low_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    old = _fake_checkpoint(tmp_path / "checkpoint-1")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="not enough disk space"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]


FULL_DISK = """
import sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
from test_checkpoints import _fake_checkpoint, _save
from sdlora.errors import UserError
root = Path(sys.argv[1])
_fake_checkpoint(root / "checkpoint-1")
try:
    _save(root, 2, lora_bytes=3_000_000)  # more than the 2 MB filesystem holds
except UserError as e:
    print("error:", e)
print(sorted(p.name for p in root.iterdir()))
"""


def test_a_disk_that_fills_up_during_the_save_leaves_no_partial_checkpoint(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("needs unshare to mount a small private tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    code = FULL_DISK.format(repo=str(Path(__file__).parent.parent), tests=str(Path(__file__).parent))
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=2m tmpfs "{mount}" && exec "{sys.executable}" -c "$0" "{mount}"',
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in result.stderr and result.returncode != 0 and "error:" not in result.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()[:200]}")
    assert "checkpoint-2: could not be written" in result.stdout and "Nothing was deleted" in result.stdout, (
        result.stderr
    )
    assert (
        result.stdout.strip().splitlines()[-1] == "['checkpoint-1']"
    )  # no checkpoint-2, no temporary folder
