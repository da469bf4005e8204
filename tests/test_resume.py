"""Resuming a run: nothing left to do, settings that changed, a forced resume's new learning rate, and the
features that meet a resume (SDXL x bf16 x text encoder x DoRA x gradient checkpointing x shuffled captions
x non-default buckets x a separate held-out set)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import LATEST, lora_header, same_weights, train
from test_train_script import ok, refused

from sdlora.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow


def logged(log_dir, tag: str) -> dict[int, float]:
    """{step: value} of a scalar over every event file of the folder (a resumed run writes a file of its
    own), the later write winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return {e.step: e.value for e in sorted(events, key=lambda e: e.wall_time)}


def test_a_resume_with_nothing_left_to_do_writes_the_final_outputs(tmp_path, tiny_model, tiny_dataset):
    out, common = tmp_path / "out", ("--max_train_steps", "4", "--checkpointing_steps", "4")
    stopped = train(tiny_model, tiny_dataset, out, *common, env={"SDLORA_STOP_AT": "step:4"})
    assert stopped.returncode == 2 and "resume with --resume_from_checkpoint latest" in stopped.stderr
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4"] and not (out / "README.md").exists()
    resumed = ok(train(tiny_model, tiny_dataset, out, *common, *LATEST))
    assert "starting at 4" in resumed.stderr and same_weights(out, out / "checkpoint-4")
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file() and (out / "config.toml").is_file()
    # 8 images at batch 2: 4 steps make one epoch.
    assert lora_header(out)["ss_steps"] == "4" and lora_header(out)["ss_epoch"] == "1"
    ok(train(tiny_model, tiny_dataset, out, *common, *LATEST))  # a finished run run again: the same end
    assert same_weights(out, out / "checkpoint-4")
    refused(
        train(tiny_model, tiny_dataset, out, "--max_train_steps", "2", *LATEST),
        "checkpoint-4",
        "past the 2 steps",
    )
    no_epochs = train(tiny_model, tiny_dataset, out, "--num_train_epochs", "0")
    assert no_epochs.returncode == 2 and "error: --num_train_epochs must be at least 1" in no_epochs.stderr


def test_a_failed_final_save_keeps_the_last_checkpoint_and_resumes_to_the_outputs(
    tmp_path, tiny_model, tiny_dataset
):
    out, common = tmp_path / "out", ("--max_train_steps", "4", "--checkpointing_steps", "2")
    full = refused(
        train(tiny_model, tiny_dataset, out, *common, env={"SDLORA_FAIL_AT": "final-save"}),
        "final LoRA could not be written",
        "No space left",
        "checkpoint-4",
    )
    assert "--resume_from_checkpoint latest" in full
    # Neither file, not one of two: a web UI never picks up half a result.
    assert not list(out.glob("pytorch_lora_weights*")) and not list(out.glob(".lora-*"))
    ok(train(tiny_model, tiny_dataset, out, *common, *LATEST))
    assert same_weights(out, out / "checkpoint-4")


def test_resume_with_other_settings_is_refused_naming_each(tmp_path, tiny_model, tiny_dataset, rich_dataset):
    out = tmp_path / "out"
    base = ("--max_train_steps", "2", "--checkpointing_steps", "2")
    ok(train(tiny_model, rich_dataset, out, *base))
    other_model = tmp_path / "model"
    shutil.copytree(tiny_model, other_model)
    changes = {
        "rank: checkpoint 4, now 8": ("--rank", "8"),
        "lora_alpha: checkpoint 4.0, now 2.0": ("--lora_alpha", "2"),
        "lora_layers": ("--lora_layers", "attn_ff"),
        "train_text_encoder": ("--train_text_encoder",),
        "use_dora": ("--use_dora",),
        "caption_column: checkpoint 'text', now 'alt'": ("--caption_column", "alt"),
        "examples: checkpoint 8, now 6": ("--max_train_samples", "6"),
        "resolution: checkpoint 64, now 32": ("--resolution", "32"),
        "crop_mode: checkpoint 'bucket', now 'center'": ("--center_crop",),
        "bucket_reso_steps: checkpoint 16, now 32": ("--bucket_reso_steps", "32"),
        "min_bucket_reso: checkpoint 32, now 48": ("--min_bucket_reso", "48"),
        "max_bucket_reso: checkpoint 128, now 96": ("--max_bucket_reso", "96"),
        "bucket_no_upscale": ("--bucket_no_upscale",),
        "random_flip": ("--random_flip",),
        "image_interpolation_mode: checkpoint 'lanczos', now 'nearest'": (
            "--image_interpolation_mode",
            "nearest",
        ),
        "background": ("--background", "black"),
        "caption_prefix": ("--caption_prefix", "sks"),
        "caption_suffix": ("--caption_suffix", "sks"),
        "caption_dropout_rate": ("--caption_dropout_rate", "0.1"),
        "shuffle_caption": ("--shuffle_caption",),
        "keep_tokens": ("--keep_tokens", "1"),
        "caption_tag_dropout_rate": ("--caption_tag_dropout_rate", "0.1"),
        "prediction_type: checkpoint 'epsilon', now 'v_prediction'": ("--prediction_type", "v_prediction"),
        "pretrained_vae_model_name_or_path": ("--pretrained_vae_model_name_or_path", str(tiny_model / "vae")),
        "snr_gamma": ("--snr_gamma", "5"),
        "noise_offset": ("--noise_offset", "0.1"),
        "learning_rate: checkpoint 0.001, now 0.0005": ("--learning_rate", "5e-4"),
        "adam_beta1": ("--adam_beta1", "0.8"),
        "adam_beta2": ("--adam_beta2", "0.99"),
        "adam_epsilon": ("--adam_epsilon", "1e-6"),
        "adam_weight_decay": ("--adam_weight_decay", "0"),
        "train_batch_size: checkpoint 2, now 4": ("--train_batch_size", "4"),
        "gradient_accumulation_steps: checkpoint 1, now 2": ("--gradient_accumulation_steps", "2"),
        "seed: checkpoint 7, now 8": ("--seed", "8"),
    }
    for words, extra in changes.items():
        refused(
            train(tiny_model, rich_dataset, out, *base, "--max_train_steps", "4", *LATEST, *extra),
            words,
            "--force_resume",
        )
    refused(train(other_model, rich_dataset, out, *base, *LATEST), "base_model: checkpoint")
    refused(train(tiny_model, tiny_dataset, out, *base, *LATEST), "dataset: checkpoint")
    forced = ok(
        train(
            tiny_model, rich_dataset, out, "--max_train_steps", "4", *LATEST, "--seed", "8", "--force_resume"
        )
    )
    assert "resuming despite other settings" in forced.stderr and "resumed from" in forced.stderr


def test_a_forced_resume_trains_on_with_the_new_learning_rate_and_eval_mode_held_out_scores(
    tmp_path, tiny_model, tiny_dataset
):
    """--force_resume --learning_rate 0: the new rate is what trains (and what the files record), so the
    weights stay as the checkpoint left them; and two held-out scorings of the same weights, with LoRA
    dropout on the trained text encoder, give the same number."""
    out = tmp_path / "out"
    common = (
        "--train_text_encoder",
        "--lora_dropout",
        "0.5",
        "--validation_split",
        "2",
        "--checkpointing_steps",
        "2",
    )
    common += ("--validation_loss_steps", "1", "--lr_scheduler", "constant")
    ok(train(tiny_model, tiny_dataset, out, *common, "--max_train_steps", "2"))
    forced = ok(
        train(
            tiny_model,
            tiny_dataset,
            out,
            *common,
            "--max_train_steps",
            "4",
            *LATEST,
            "--force_resume",
            "--learning_rate",
            "0",
        )
    )
    assert (
        "learning_rate: checkpoint 0.001, now 0.0" in forced.stderr
        and "this run's learning rates" in forced.stderr
    )
    assert same_weights(out, out / "checkpoint-2")
    lr = logged(out / "logs", "lr")
    assert [lr[step] for step in (1, 2, 3, 4)] == [pytest.approx(1e-3), pytest.approx(1e-3), 0.0, 0.0]
    losses = [row.split(",")[1] for row in (out / "validation_loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and losses[2] == losses[3], losses  # steps 3 and 4: the same weights
    assert lora_header(out)["ss_learning_rate"] == "0.0"
    assert json.loads((out / "args.json").read_text())["learning_rate"] == 0.0


def test_sdxl_in_bf16_with_every_feature_that_meets_a_resume(tmp_path, tiny_sdxl, rich_dataset):
    """bf16 x SDXL x both text encoders x DoRA x gradient checkpointing x shuffled captions x non-default
    buckets, stopped and resumed: the uninterrupted run's weights."""
    common = (
        *("--mixed_precision", "bf16", "--train_text_encoder", "--use_dora", "--gradient_checkpointing"),
        *("--caption_column", "tags", "--shuffle_caption", "--keep_tokens", "1", "--bucket_reso_steps", "32"),
        *("--min_bucket_reso", "64", "--max_bucket_reso", "192", "--checkpointing_steps", "1"),
        *("--max_train_steps", "2"),
    )
    ok(train(tiny_sdxl, rich_dataset, tmp_path / "straight", *common))
    out = tmp_path / "out"
    assert train(tiny_sdxl, rich_dataset, out, *common, env={"SDLORA_STOP_AT": "step:1"}).returncode == 2
    ok(train(tiny_sdxl, rich_dataset, out, *common, *LATEST))
    assert same_weights(out, tmp_path / "straight")
    header = lora_header(out, "pytorch_lora_weights_kohya.safetensors")
    assert header["ss_mixed_precision"] == "bf16" and header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert json.loads(header["ss_bucket_info"])["buckets"]["0"]["resolution"][0] % 32 == 0


def test_a_compiled_unet_with_a_separate_held_out_set_resumes_exactly(
    tmp_path, tiny_model, tiny_dataset, rich_dataset
):
    """torch.compile x gradient checkpointing x a separate held-out set x kill and resume."""
    common = (
        *(
            "--torch_compile",
            "--torch_compile_backend",
            "aot_eager",
            "--gradient_checkpointing",
            "--center_crop",
        ),
        *("--validation_dataset_disk_path", str(rich_dataset), "--validation_loss_steps", "1"),
        *("--validation_loss_timesteps", "2", "--checkpointing_steps", "1", "--max_train_steps", "3"),
    )
    ok(train(tiny_model, tiny_dataset, tmp_path / "straight", *common))
    out = tmp_path / "out"
    assert train(tiny_model, tiny_dataset, out, *common, env={"SDLORA_STOP_AT": "step:2"}).returncode == 2
    ok(train(tiny_model, tiny_dataset, out, *common, *LATEST))
    assert same_weights(out, tmp_path / "straight") and same_weights(
        out / "best", tmp_path / "straight" / "best"
    )
    assert (out / "validation_loss.csv").read_text() == (
        tmp_path / "straight" / "validation_loss.csv"
    ).read_text()


def test_a_killed_and_resumed_run_of_the_demo_learns_what_the_uninterrupted_one_does(tmp_path):
    """The README's demo recipe on tiny-shapes (which really learns), killed with SIGKILL mid-run and resumed
    from its last checkpoint: the same LoRA as a run never stopped, bit for bit, so the same pictures, and a
    LoRA that has begun to draw the heart the base model never does."""
    import signal

    from conftest import build_root_dataset, run_script, script_command

    from sdlora.generation import load_pipeline
    from sdlora.sample_data import write_demo_data
    from sdlora.shapes_demo import DEFAULT_SHAPE, trigger_prompts
    from sdlora.shapes_eval import sample_and_score
    from sdlora.shapes_score import predict, shape_rate
    from sdlora.tiny_model import TINY_SHAPES_DIR

    write_demo_data(tmp_path)
    data = build_root_dataset(tmp_path)
    run = (
        *("--resolution", "64", "--train_batch_size", "8"),
        *("--max_train_steps", "120", "--checkpointing_steps", "60"),
    )
    ok(train(TINY_SHAPES_DIR, data, tmp_path / "straight", *run))
    out = tmp_path / "out"
    killed = run_script(script_command(TINY_SHAPES_DIR, data, out, *run), env={"SDLORA_KILL_AT": "step:90"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-60"]
    assert "starting at 60" in ok(train(TINY_SHAPES_DIR, data, out, *run, *LATEST)).stderr
    assert same_weights(out, tmp_path / "straight")
    prompts = trigger_prompts(DEFAULT_SHAPE, 16)
    drawn = {}
    for name, lora in (("base", None), ("resumed", out), ("straight", tmp_path / "straight")):
        pipe, _ = load_pipeline(str(TINY_SHAPES_DIR), lora)
        drawn[name] = sample_and_score(pipe, prompts)["images"]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(drawn["resumed"], drawn["straight"]))
    assert shape_rate(predict(drawn["base"]), DEFAULT_SHAPE) == 0
    assert shape_rate(predict(drawn["resumed"]), DEFAULT_SHAPE) >= 1 / 16
