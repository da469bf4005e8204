"""The held-out loss in a training run: held-out images never trained on, best/ and early stopping, exact resume."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import lora_header, read_trace, same_weights, train

from sdlora.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow

# A learning rate the tiny model cannot take: the held-out loss falls for a few evaluations, then rises.
# (The tiny model's random-weight VAE gives latents with almost no signal, std 0.045, so it cannot overfit
# its data as a real model does; a too-high learning rate drives the same curve through the same code.)
UNSTABLE = (
    *("--learning_rate", "5e-2", "--validation_split", "2", "--validation_loss_steps", "3"),
    *("--checkpointing_steps", "10", "--max_train_steps", "60", "--validation_loss_timesteps", "4"),
)


def rows(out):
    with open(out / "validation_loss.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model, tiny_dataset):
    out, trace = tmp_path_factory.mktemp("early") / "out", tmp_path_factory.mktemp("trace")
    result = train(
        tiny_model,
        tiny_dataset,
        out,
        *UNSTABLE,
        "--early_stopping_patience",
        "3",
        env={"SDLORA_TRACE_DIR": str(trace)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, read_trace(trace)[0]


def test_held_out_images_never_appear_in_a_training_batch(stopped, tiny_dataset):
    from sdlora.heldout import split_examples

    _, held = split_examples(8, "2", seed=7)
    trained = {i for e in stopped[2] if e["event"] == "batch" for i in e["index"]}
    assert trained == set(range(8)) - set(held) and len(held) == 2
    assert lora_header(stopped[0])["ss_num_train_images"] == "6"


def test_early_stopping_keeps_the_best_step_and_ends_like_a_normal_run(stopped):
    out, result, _ = stopped
    table = rows(out)
    losses = [float(r["val_loss"]) for r in table]
    best = min(range(len(losses)), key=losses.__getitem__)
    # The curve fell, then rose for 3 evaluations (the patience), and training stopped there.
    assert 0 < best == len(losses) - 4 and all(v > losses[best] for v in losses[best + 1 :])
    last = int(table[-1]["step"])
    assert last < 60 and "early stopping after step" in result.stderr
    # The epoch reached (of the last batch trained), not the epochs the 60 steps would have taken.
    reached = max(e["epoch"] for e in stopped[2] if e["event"] == "batch") + 1
    assert lora_header(out)["ss_epoch"] == str(reached) and reached < int(
        result.stderr.split("epochs = ")[1].split(",")[0]
    )
    best_step = int(table[best]["step"])
    assert json.loads((out / "best" / "step.json").read_text()) == {
        "step": best_step,
        "val_loss": losses[best],
    }
    assert lora_header(out / "best")["ss_steps"] == str(best_step)
    assert not same_weights(out / "best", out)
    # The outputs are those of a normal end, at the step it stopped.
    assert lora_header(out)["ss_steps"] == str(last) and list_checkpoints(out)[-1][0] == last
    assert same_weights(out / f"checkpoint-{last}", out)
    card = (out / "README.md").read_text()
    assert "validation_loss.png" in card and f"at step {best_step}" in card and "best" in card
    assert (out / "validation_loss.png").is_file()


def test_a_killed_and_resumed_run_gives_the_same_losses_best_step_and_stop(
    tmp_path, stopped, tiny_model, tiny_dataset
):
    out = tmp_path / "out"
    common = (*UNSTABLE, "--early_stopping_patience", "3")
    interrupted = train(tiny_model, tiny_dataset, out, *common, env={"SDLORA_STOP_AT": "step:13"})
    assert interrupted.returncode == 2
    (out / "checkpoint-13").rename(out / "checkpoint-13-gone")  # as if killed after 13: resume from 10
    resumed = train(tiny_model, tiny_dataset, out, *common, "--resume_from_checkpoint", "checkpoint-10")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(out) == rows(stopped[0])  # bit-identical loss values, the killed run's later rows gone
    assert (out / "best" / "step.json").read_text() == (stopped[0] / "best" / "step.json").read_text()
    assert same_weights(out, stopped[0]) and same_weights(out / "best", stopped[0] / "best")


def test_too_few_images_to_hold_out_is_a_clear_error(tmp_path, tiny_model, tiny_dataset):
    result = train(tiny_model, tiny_dataset, tmp_path / "out", "--validation_split", "8")
    assert (
        result.returncode == 2 and "--validation_split" in result.stderr and "Traceback" not in result.stderr
    )


def test_losses_go_to_tensorboard_and_a_separate_held_out_set_works(
    tmp_path, stopped, tiny_model, tiny_dataset, rich_dataset
):
    from test_train_script import scalars_and_images

    scalars, _ = scalars_and_images(stopped[0] / "logs")
    assert len(scalars["val/loss"]) == len(rows(stopped[0])) and len(scalars["val/train_loss"]) == len(
        scalars["val/loss"]
    )
    assert len([t for t in scalars if t.startswith("val/loss_t")]) == 4
    out = tmp_path / "out"
    result = train(
        tiny_model,
        rich_dataset,
        out,
        "--max_train_steps",
        "4",
        "--validation_dataset_disk_path",
        str(tiny_dataset),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out loss: 8 images" in result.stderr and [r["step"] for r in rows(out)] == ["4"]
    assert (out / "best" / "step.json").is_file()
    bad = train(tiny_model, tiny_dataset, out, "--early_stopping_patience", "2")
    assert bad.returncode == 2 and "needs a held-out set" in bad.stderr


def test_random_crops_are_scored_at_a_fixed_crop(tmp_path, tiny_model, tiny_dataset):
    """--random_crop with a held-out set: each image is scored at one seeded crop, so the same weights give
    the same loss in every epoch (at learning rate 0 the weights never change)."""
    out = tmp_path / "out"
    flags = (
        "--random_crop",
        "--validation_split",
        "2",
        "--validation_loss_steps",
        "3",
        "--max_train_steps",
        "6",
    )
    result = train(
        tiny_model, tiny_dataset, out, *flags, "--learning_rate", "0", "--validation_loss_timesteps", "2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (first, second) = rows(out)  # steps 3 and 6: the first and second epoch (6 images at batch 2)
    assert first["step"] == "3" and second["step"] == "6" and first["val_loss"] == second["val_loss"]
    assert first["train_loss"] == second["train_loss"]
