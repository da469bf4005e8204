"""The output folder: what --overwrite_output_dir replaces and when, folders that cannot be written, and
what the run leaves for a web UI running as another user."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import train
from test_train_script import ok, refused

from sdlora.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow

EARLIER = (
    *(
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--validation_split",
        "2",
        "--validation_steps",
        "2",
    ),
    *(
        "--validation_prompt",
        "a red circle",
        "--num_validation_images",
        "1",
        "--validation_num_inference_steps",
        "2",
    ),
)


def test_overwriting_replaces_everything_the_earlier_run_left_once_the_new_run_has_saved(
    tmp_path, tiny_model, tiny_dataset
):
    out = tmp_path / "out"
    ok(train(tiny_model, tiny_dataset, out, *EARLIER))
    earlier = [
        "best",
        "validation_loss.csv",
        "validation_loss.png",
        "checkpoint-2",
        "checkpoint-4",
        "validation/step-2",
    ]
    assert all((out / name).exists() for name in earlier)
    events = sorted(p.name for p in (out / "logs").rglob("events.out.tfevents.*"))
    # A new run that fails before it has saved anything leaves the earlier run as it was.
    diverges = ("--learning_rate", "1e30", "--adam_epsilon", "1e-30", "--max_grad_norm", "1e30")
    failed = train(
        tiny_model, tiny_dataset, out, "--overwrite_output_dir", "--max_train_steps", "30", *diverges
    )
    assert failed.returncode == 2 and "NaN or infinite" in failed.stderr
    assert all((out / name).exists() for name in earlier)
    # One that saves only its final LoRA (no held-out set, no checkpoint) replaces all of it; what it writes
    # follows the umask, so a web UI running as another user can read it.
    umask = os.umask(0o022)
    try:
        ok(
            train(
                tiny_model,
                tiny_dataset,
                out,
                "--overwrite_output_dir",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "100",
            )
        )
    finally:
        os.umask(umask)
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "config.toml",
        "README.md",
    ):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert not any((out / name).exists() for name in earlier) and not list_checkpoints(out)
    assert not any(p.name in events for p in (out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "config.toml").is_file()


def test_folders_that_cannot_be_written_are_refused_before_any_work(tmp_path, tiny_model, tiny_dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refused(train(tiny_model, tiny_dataset, blocker / "out"), "not a folder", "--output_dir")
    refused(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "out",
            "--cache_latents_to_disk",
            "--latents_cache_dir",
            str(blocker / "c"),
        ),
        "--latents_cache_dir",
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written
