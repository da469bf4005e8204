"""Faults during training: kills at any moment, Ctrl-C, NaN, full disks, stray folders, mismatched resumes,
and bad images in the training data. Each test builds the fault itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_script, train_command
from image_corpus import invalid
from PIL import Image
from safetensors.torch import load_file

from sdlora import checkpoints
from sdlora.errors import UserError

pytestmark = pytest.mark.slow

# 8 examples, batch 2: 4 steps per epoch. Checkpoints at 3 and 6; 9 steps in all.
RUN = (
    "--max_train_steps",
    "9",
    "--checkpointing_steps",
    "3",
    "--random_flip",
    "--center_crop",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "2",
)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, tiny_dataset) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight")
    result = run_script(train_command(tiny_model, tiny_dataset, out, *RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(out)


@pytest.mark.parametrize(
    "kill_at,latest",
    [
        ("step:2", None),  # before the first checkpoint: the resume starts afresh
        ("step:4", "checkpoint-3"),  # right after the first epoch ends
        ("save:6", "checkpoint-3"),  # while checkpoint-6 is half-written
        ("step:8", "checkpoint-6"),
    ],
)
def test_sigkill_then_resume_matches_uninterrupted_run(
    tmp_path, tiny_model, tiny_dataset, uninterrupted, kill_at, latest
):
    out = tmp_path / "out"
    killed = run_script(train_command(tiny_model, tiny_dataset, out, *RUN), env={"SDLORA_KILL_AT": kill_at})
    assert killed.returncode != 0
    found = checkpoints.list_checkpoints(out)
    assert (found[-1][1].name if found else None) == latest  # a half-written folder is never a checkpoint
    resumed = run_script(
        train_command(tiny_model, tiny_dataset, out, *RUN, "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = weights(out)
    assert all(torch.equal(final[k], uninterrupted[k]) for k in uninterrupted)
    assert not list(out.glob(".checkpoint-*"))  # leftovers of the killed save are cleaned up


def test_ctrl_c_saves_a_checkpoint_at_the_current_step(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    command = train_command(
        tiny_model, tiny_dataset, out, "--max_train_steps", "100000", "--checkpointing_steps", "100000"
    )
    # Run the script itself: accelerate's launcher answers Ctrl-C with a traceback of its own and returns
    # before the training process has finished saving, which would race this test.
    command = [
        command[0],
        *command[command.index(next(c for c in command if c.endswith("train_text_to_image_lora.py"))) :],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    deadline = time.time() + 240
    for line in process.stderr:  # wait until training is under way
        if "step=" in line:
            break
        assert time.time() < deadline
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 2
    assert "resume with --resume_from_checkpoint latest" in rest and "Traceback" not in rest
    ((step, path),) = checkpoints.list_checkpoints(out)
    assert step > 0 and json.loads((path / "training_state.json").read_text())["global_step"] == step


def test_nan_loss_stops_with_the_step_and_saves_nothing_corrupt(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    result = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            out,
            "--max_train_steps",
            "30",
            "--checkpointing_steps",
            "1",
            "--learning_rate",
            "1e30",
            "--adam_epsilon",
            "1e-30",
            "--max_grad_norm",
            "1e30",
        )
    )
    assert result.returncode != 0
    assert "loss became NaN or infinite at step" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    for _, path in checkpoints.list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in weights(path).values()), path


def test_resume_with_other_settings_is_refused_with_the_difference(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    assert (
        run_script(
            train_command(
                tiny_model, tiny_dataset, out, "--max_train_steps", "3", "--checkpointing_steps", "3"
            )
        ).returncode
        == 0
    )
    result = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            out,
            "--max_train_steps",
            "6",
            "--rank",
            "8",
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert result.returncode != 0
    assert "rank: checkpoint 4, now 8" in result.stderr and "--force_resume" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_training_images_are_all_named_and_outputs_kept(tmp_path, tiny_model):
    data = tmp_path / "data"
    bad = invalid(data)
    Image.new("RGB", (80, 80), "red").save(data / "good.png")
    bad.pop("bomb.png").unlink()  # the imagefolder loader itself refuses bombs, before our loader sees them
    names = ["good.png", *bad]
    (data / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": "x"}) + "\n" for n in names)
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"an earlier run's weights")
    command = train_command(tiny_model, tmp_path, out, "--max_train_steps", "2")
    command[command.index("--dataset_from_disk")] = "--train_data_dir"
    command[command.index("--dataset_disk_path") : command.index("--dataset_disk_path") + 2] = [str(data)]
    result = run_script(command)
    assert result.returncode != 0
    for name in bad:
        assert name in result.stderr
    assert "cannot be used" in result.stderr and "Traceback" not in result.stderr
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"an earlier run's weights"
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]


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


def test_full_disk_fails_before_anything_is_deleted_or_written(tmp_path, monkeypatch, tiny_model):
    from diffusers import UNet2DConditionModel

    from sdlora.lora import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora(unet, 4, 4)
    old = _fake_checkpoint(tmp_path / "checkpoint-1")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="not enough disk space"):
        checkpoints.save_checkpoint(tmp_path, 2, unet, None, None, None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
