"""Faults during training in real processes: kills at any moment, Ctrl-C and SIGTERM, a signal to one of
several processes, NaN, and bad images in the training data. Each test builds the fault itself."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import LATEST, REPO, free_port, run_script, same_weights, script_command, train, train_command
from image_corpus import invalid
from PIL import Image

from sdlora import checkpoints

pytestmark = pytest.mark.slow

# 8 examples, batch 2, square crops: 4 steps per epoch. Checkpoints at 3 and 6; 9 steps in all.
RUN = (
    *("--max_train_steps", "9", "--checkpointing_steps", "3", "--random_flip", "--center_crop"),
    *("--lr_scheduler", "cosine", "--lr_warmup_steps", "2"),
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    result = train(tiny_model, tiny_dataset, out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


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
    killed = run_script(script_command(tiny_model, tiny_dataset, out, *RUN), env={"SDLORA_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    found = checkpoints.list_checkpoints(out)
    assert (found[-1][1].name if found else None) == latest  # a half-written folder is never a checkpoint
    resumed = train(tiny_model, tiny_dataset, out, *RUN, *LATEST)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(out, uninterrupted)
    assert not list(out.glob(".checkpoint-*"))  # leftovers of the killed save are cleaned up


def start(command: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )


def read_until(process: subprocess.Popen, text: str, timeout: float = 240) -> str:
    """stderr up to the first line containing `text` (tqdm's \\r updates count as lines); fails on timeout."""
    seen, deadline = "", time.time() + timeout
    selector = selectors.DefaultSelector()
    selector.register(process.stderr, selectors.EVENT_READ)
    while text not in seen:
        if time.time() > deadline or process.poll() is not None and not selector.select(0):
            process.kill()
            pytest.fail(f"no {text!r} within {timeout}s: {seen[-2000:]}")
        if selector.select(timeout=1):
            chunk = os.read(process.stderr.fileno(), 65536).decode(errors="replace")
            seen += chunk
    return seen


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    """The rest of stderr, once the process has exited (killed, and the test failed, if it hangs)."""
    try:
        _, rest = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run did not stop: a process hung")
    return rest


def test_ctrl_c_under_the_launcher_saves_a_checkpoint_without_a_traceback(tmp_path, tiny_model, tiny_dataset):
    """The README's way: train_text_to_image_lora.sh (accelerate launch --quiet), Ctrl-C to the whole group."""
    out = tmp_path / "out"
    env = {
        "MODEL_NAME": str(tiny_model),
        "DATASET_DIR": str(tiny_dataset),
        "OUTPUT_DIR": str(out),
        "LAUNCH": f"--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port {free_port()}",
    }
    extra = ("--max_train_steps", "100000", "--logging_steps", "1", "--checkpointing_steps", "100000")
    process = start(["bash", str(REPO / "train_text_to_image_lora.sh"), *extra], cwd=REPO, env=env)
    seen = read_until(process, "step=")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    rest = seen + finish(process)
    assert process.returncode != 0
    assert "resume with --resume_from_checkpoint latest" in rest and "Traceback" not in rest, rest[-3000:]
    ((step, path),) = checkpoints.list_checkpoints(out)
    assert step > 0 and json.loads((path / "training_state.json").read_text())["global_step"] == step


def test_sigterm_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(
    tmp_path, tiny_model, tiny_dataset
):
    common = ("--max_train_steps", "80", "--checkpointing_steps", "1000", "--center_crop", "--random_flip")
    process = start(script_command(tiny_model, tiny_dataset, tmp_path / "out", *common))
    read_until(process, "step=")
    process.send_signal(signal.SIGTERM)
    rest = finish(process)
    assert process.returncode == 2 and "stopped by signal 15" in rest and "Traceback" not in rest
    ((step, _),) = checkpoints.list_checkpoints(tmp_path / "out")
    assert 0 < step < 80
    resumed = train(tiny_model, tiny_dataset, tmp_path / "out", *common, *LATEST)
    assert resumed.returncode == 0 and f"starting at {step}" in resumed.stderr
    assert train(tiny_model, tiny_dataset, tmp_path / "straight", *common).returncode == 0
    assert same_weights(tmp_path / "out", tmp_path / "straight")


def rank_processes(launcher: subprocess.Popen) -> dict[int, int]:
    """{RANK: pid} of the training processes a launcher started (torch's elastic agent puts each worker in
    a session of its own), read from their environments."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if (
                not proc.name.isdigit()
                or int((proc / "stat").read_text().split(")")[1].split()[1]) != launcher.pid
            ):
                continue
            environ = dict(
                item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(proc.name)
    return found


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    command = train_command(
        tiny_model,
        tiny_dataset,
        out,
        "--max_train_steps",
        "100000",
        "--checkpointing_steps",
        "100000",
        processes=2,
    )
    process = start(command)
    read_until(process, "step=")
    ranks = rank_processes(process)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only the second process is told to stop
    rest = finish(process, timeout=180)  # no process is left waiting in a collective
    assert process.returncode != 0
    ((step, _),) = checkpoints.list_checkpoints(out)
    assert f"stopped by a signal to another process after step {step}" in rest, rest[-3000:]
    assert f"stopped by signal 15 after step {step}" in rest


def test_nan_loss_stops_with_the_step_and_saves_nothing_corrupt(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    result = train(
        tiny_model,
        tiny_dataset,
        out,
        *("--max_train_steps", "30", "--checkpointing_steps", "1", "--learning_rate", "1e30"),
        *("--adam_epsilon", "1e-30", "--max_grad_norm", "1e30"),
    )
    assert result.returncode == 2
    assert "loss became NaN or infinite at step" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    from safetensors.torch import load_file

    bad = int(re.search(r"NaN or infinite at step (\d+)", result.stderr).group(1))
    # A checkpoint for every step before the bad one (checkpointing every step), none from it on, all finite.
    assert bad > 1 and [s for s, _ in checkpoints.list_checkpoints(out)] == list(range(1, bad))
    for _, path in checkpoints.list_checkpoints(out):
        weights = load_file(str(path / "pytorch_lora_weights.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), path


def test_bad_training_images_are_all_named_and_outputs_kept(tmp_path, tiny_model):
    from test_train_script import train_from_folder

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
    result = train_from_folder(tiny_model, data, out, "--max_train_steps", "2")
    assert result.returncode == 2
    for name in bad:
        assert name in result.stderr
    assert "cannot be used" in result.stderr and "Traceback" not in result.stderr
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"an earlier run's weights"
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]
