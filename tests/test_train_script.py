"""train_text_to_image_lora.py end to end on the tiny model, in subprocesses as users run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script, train_command
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "pytorch_lora_weights.safetensors"))


def scalars_and_images(log_dir: Path) -> tuple[dict[str, list[float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, []
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
        images += acc.Tags()["images"]
    return scalars, images


def test_end_to_end_outputs(tmp_path, tiny_model, tiny_dataset, repo):
    out = tmp_path / "out"
    result = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            out,
            "--max_train_steps",
            "12",
            "--checkpointing_steps",
            "4",
            "--checkpoints_total_limit",
            "2",
            "--validation_prompts_dir",
            str(repo / "validation_prompts.txt"),
            "--num_validation_images",
            "2",
            "--validation_epochs",
            "2",
            "--validation_num_inference_steps",
            "3",
            "--center_crop",
            "--lora_alpha",
            "8",
            "--random_flip",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "total optimization steps = 12" in result.stderr

    # The LoRA loads into a plain pipeline and changes what it draws.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    before = pipe("a red circle", **kwargs).images
    pipe.load_lora_weights(str(out))
    kwargs["generator"] = torch.Generator().manual_seed(0)
    after = pipe("a red circle", **kwargs).images
    assert abs(after - before).max() > 1e-3

    # The kohya/A1111 copy (alpha 8 in the file) gives the same image as the diffusers file.
    kohya = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    kohya.set_progress_bar_config(disable=True)
    kohya.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert abs(kohya("a red circle", **kwargs).images - after).max() < 1e-5
    assert (
        load_file(str(out / "pytorch_lora_weights_kohya.safetensors"))[
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
        ].item()
        == 8.0
    )

    # Rotation kept the newest two checkpoints, each with weights in the same loadable format.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert load_weights(out / "checkpoint-12").keys() == load_weights(out).keys()

    # 4 steps per epoch: validation after epochs 2 (step 8) and at the end with the saved file (step 12).
    for step in (8, 12):
        pngs = sorted(p.name for p in (out / "validation" / f"step-{step}").glob("*.png"))
        assert len(pngs) == 4, pngs
    assert not (out / "validation" / "step-4").exists()

    scalars, images = scalars_and_images(out / "logs")
    assert len(scalars["loss"]) == 12 and len(scalars["lr"]) == 12
    assert any("red-circle" in tag for tag in images) and any("blue-square" in tag for tag in images)
    args = json.loads((out / "args.json").read_text())
    assert args["rank"] == 4 and args["lora_alpha"] == 8.0 and args["resolution"] == 64
    assert "load_lora_weights" in (out / "README.md").read_text()
    assert "time: total" in result.stderr


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model, tiny_dataset):
    common = (
        "--checkpointing_steps",
        "3",
        "--random_flip",
        "--gradient_accumulation_steps",
        "2",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--max_train_steps",
        "8",
    )
    straight = run_script(train_command(tiny_model, tiny_dataset, tmp_path / "a", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Killed (SIGKILL) after step 5, with checkpoint-3 on disk; then resumed.
    killed = run_script(
        train_command(tiny_model, tiny_dataset, tmp_path / "b", *common), env={"SDLORA_KILL_AT": "step:5"}
    )
    assert killed.returncode != 0 and (tmp_path / "b" / "checkpoint-3").is_dir()
    resumed = run_script(
        train_command(tiny_model, tiny_dataset, tmp_path / "b", *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_path_trains_like_plain_path(tmp_path, tiny_model, tiny_dataset):
    common = ("--max_train_steps", "6", "--center_crop", "--random_flip")
    cached = run_script(train_command(tiny_model, tiny_dataset, tmp_path / "cached", *common))
    plain = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            tmp_path / "plain",
            *common,
            "--no-cache_latents",
            "--no-cache_text_embeddings",
        )
    )
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr[-2000:] + plain.stderr[-2000:]
    a, b = load_weights(tmp_path / "cached"), load_weights(tmp_path / "plain")
    # Same noise, timesteps and latent samples: only float rounding of batched vs single encodes differs.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize(
    "launch,extra",
    [
        (("--num_processes", "1", "--mixed_precision", "bf16"), ()),
        (("--num_processes", "2", "--mixed_precision", "no"), ()),
        (("--num_processes", "1", "--mixed_precision", "no"), ("--use_8bit_adam",)),
    ],
    ids=["bf16", "two-processes", "8bit-adam"],
)
def test_precision_processes_and_8bit_adam_train(tmp_path, tiny_model, tiny_dataset, launch, extra):
    result = run_script(
        train_command(
            tiny_model, tiny_dataset, tmp_path / "out", "--max_train_steps", "4", *extra, launch=launch
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_weights(tmp_path / "out")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(
        k.endswith("up.weight") and w.abs().max() > 0 for k, w in weights.items()
    )  # B moved off its zero init
    scalars, _ = scalars_and_images(tmp_path / "out" / "logs")
    assert len(scalars["loss"]) == 4


def test_fp16_on_cpu_is_refused_with_a_remedy(tmp_path, tiny_model, tiny_dataset):
    result = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            tmp_path / "out",
            "--max_train_steps",
            "2",
            launch=("--num_processes", "1", "--mixed_precision", "fp16"),
        )
    )
    assert result.returncode != 0
    assert "use --mixed_precision bf16 or no" in result.stderr and "Traceback" not in result.stderr


def test_disk_cache_is_reused_across_runs_and_never_for_other_settings(tmp_path, tiny_model, tiny_dataset):
    cache = tmp_path / "cache"
    common = (
        "--max_train_steps",
        "2",
        "--center_crop",
        "--cache_latents_to_disk",
        "--latents_cache_dir",
        str(cache),
    )
    first = run_script(train_command(tiny_model, tiny_dataset, tmp_path / "a", *common))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "cache written to" in first.stderr and "reusing the cache" not in first.stderr
    again = run_script(train_command(tiny_model, tiny_dataset, tmp_path / "b", *common))
    assert again.stderr.count("reusing the cache") == 2  # latents and text embeddings
    bigger = run_script(
        train_command(tiny_model, tiny_dataset, tmp_path / "c", *common, "--resolution", "128")
    )
    assert bigger.returncode == 0, bigger.stderr[-2000:]
    assert bigger.stderr.count("reusing the cache") == 1  # the text cache still fits; the latents do not
    assert len(list(cache.glob("latents-*"))) == 2 and len(list(cache.glob("text-*"))) == 1


def test_a_failing_validation_is_reported_and_training_goes_on(tmp_path, tiny_model, tiny_dataset, repo):
    result = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            tmp_path / "out",
            "--max_train_steps",
            "8",
            "--validation_steps",
            "4",
            "--validation_prompts_dir",
            str(repo / "validation_prompts.txt"),
            "--validation_num_inference_steps",
            "0",
        )
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation at step 4 failed" in result.stderr and "training continues" in result.stderr
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_raising_max_train_steps_and_resuming_extends_a_finished_run(tmp_path, tiny_model, tiny_dataset):
    common = ("--checkpointing_steps", "4", "--random_flip")
    straight = run_script(
        train_command(tiny_model, tiny_dataset, tmp_path / "a", *common, "--max_train_steps", "8")
    )
    short = run_script(
        train_command(tiny_model, tiny_dataset, tmp_path / "b", *common, "--max_train_steps", "4")
    )
    assert straight.returncode == 0 and short.returncode == 0, straight.stderr[-2000:] + short.stderr[-2000:]
    longer = run_script(
        train_command(
            tiny_model,
            tiny_dataset,
            tmp_path / "b",
            *common,
            "--max_train_steps",
            "8",
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resumed from" in longer.stderr and "starting at 4" in longer.stderr
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
