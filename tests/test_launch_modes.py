"""Launch modes together with the features they meet: two processes x accumulation x checkpoints x
validation x held-out loss x disk cache x buckets x text encoders x 8-bit Adam x kill and resume, on SDXL;
bf16 x cached latents x validation x resume; the original recipe's 8-bit Adam x checkpoints x pruning x
validation x kill and resume."""

from __future__ import annotations

import signal

import pytest
from conftest import (
    LATEST,
    lora_header,
    read_trace,
    run_script,
    same_weights,
    script_command,
    train,
    train_command,
)
from safetensors import safe_open

from sdlora.checkpoints import OPTIMIZER_FILE, list_checkpoints

pytestmark = pytest.mark.slow

# SDXL on two processes with every feature that meets them: gradient accumulation (the no_sync path),
# checkpoints, validation images, the held-out loss, best/ and early stopping, the disk cache, buckets, both
# text encoders, 8-bit Adam, and a kill then resume.
TWO = (
    *("--gradient_accumulation_steps", "2", "--max_train_steps", "8", "--checkpointing_steps", "2"),
    *("--validation_steps", "3", "--validation_prompt", "a red circle", "--num_validation_images", "1"),
    *(
        "--validation_num_inference_steps",
        "2",
        "--cache_latents_to_disk",
        "--random_flip",
        "--train_batch_size",
        "1",
    ),
    *("--train_text_encoder", "--use_8bit_adam", "--validation_split", "2", "--validation_loss_steps", "2"),
    # Early stopping on both processes together: no gain counts under this delta, so the evaluations at steps
    # 4 and 6 are the 2 of the patience and every process stops after step 6 of 8.
    *("--early_stopping_patience", "2", "--early_stopping_min_delta", "1e9"),
)


def test_two_processes_share_the_data_and_cache_and_resume_exactly(tmp_path, tiny_sdxl, tiny_dataset):
    from test_families_training import check_files

    from sdlora.generation import generate, load_pipeline
    from sdlora.heldout import split_examples

    small_shards = {"SDLORA_CACHE_SHARD_SIZE": "2"}  # 8 images: 4 shards, so both processes encode some
    (tmp_path / "trace").mkdir()
    out = tmp_path / "a"
    straight = run_script(
        train_command(tiny_sdxl, tiny_dataset, out, *TWO, processes=2),
        env={**small_shards, "SDLORA_TRACE_DIR": str(tmp_path / "trace")},
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (
        "total batch size (parallel x accumulation) = 4" in straight.stderr
        and "resolution = 128" in straight.stderr
    )
    trace = read_trace(tmp_path / "trace")
    assert set(trace) == {0, 1}
    # Each process encoded its own shards of the shared disk cache: 0 and 2, 1 and 3.
    encoded = {
        r: sorted(e["shard"] for e in events if e["event"] == "encoded" and "latents" in e["cache"])
        for r, events in trace.items()
    }
    assert encoded == {0: [0, 2], 1: [1, 3]}
    # In every epoch the two processes saw disjoint images and, together, every training image once.
    trained_on, held = split_examples(8, "2", seed=7)
    batches = {r: [e for e in events if e["event"] == "batch"] for r, events in trace.items()}
    for epoch in {e["epoch"] for e in batches[0]}:
        seen = {r: [i for e in batches[r] if e["epoch"] == epoch for i in e["index"]] for r in (0, 1)}
        assert not set(seen[0]) & set(seen[1]) and not set(seen[0] + seen[1]) & set(held)
        if epoch == 0:  # (the last epoch may end early at max_train_steps)
            assert sorted(seen[0] + seen[1]) == trained_on
    finals = [next(e for e in trace[r] if e["event"] == "final")["checksum"] for r in (0, 1)]
    assert finals[0] == finals[1]  # the processes end with identical weights
    setup = next(e for e in trace[0] if e["event"] == "setup")
    assert setup["optimizer"] == "AdamW8bit"
    assert (out / "validation" / "step-3").is_dir() and (out / "best" / "step.json").is_file()
    assert "early stopping after step 6" in straight.stderr and lora_header(out)["ss_steps"] == "6"
    assert [e["step"] for e in trace[1] if e["event"] == "batch"][-1] == 6  # the other process stopped too

    # SDXL's files: kohya's own SDXL names, both text encoders, the same image in StableDiffusionXLPipeline.
    meta = lora_header(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    keys = check_files(tiny_sdxl, out, {"lora_unet", "lora_te1", "lora_te2"})
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys) and any(
        k.startswith("lora_unet_output_blocks_") for k in keys
    )
    # Our loader (the notebook's and sdlora.generate's) takes it too, at SDXL's native size.
    pipe, lora = load_pipeline(str(tiny_sdxl), out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and set(lora.layers) == {
        "unet",
        "text_encoder",
        "text_encoder_2",
    }
    assert generate(pipe, "a red circle", num_inference_steps=2)[0].size == (128, 128)

    killed = run_script(
        train_command(tiny_sdxl, tiny_dataset, tmp_path / "b", *TWO, processes=2),
        env={**small_shards, "SDLORA_KILL_AT": "step:5"},
    )
    assert killed.returncode != 0 and list_checkpoints(tmp_path / "b")[-1][0] == 4
    resumed = run_script(
        train_command(tiny_sdxl, tiny_dataset, tmp_path / "b", *TWO, *LATEST, processes=2),
        env=small_shards,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing the cache" in resumed.stderr and same_weights(tmp_path / "b", out)
    assert (out / "validation_loss.csv").read_text() == (tmp_path / "b" / "validation_loss.csv").read_text()
    one = train(tiny_sdxl, tiny_dataset, tmp_path / "b", *TWO, *LATEST, "--max_train_steps", "8")
    assert one.returncode == 2 and "num_processes: checkpoint 2, now 1" in one.stderr


def test_bf16_with_cached_latents_validation_and_resume(tmp_path, tiny_model, tiny_dataset):
    common = (
        *("--mixed_precision", "bf16", "--max_train_steps", "8", "--checkpointing_steps", "3"),
        *("--validation_steps", "4", "--validation_prompt", "a red circle", "--num_validation_images", "1"),
        *("--validation_num_inference_steps", "2", "--random_flip"),
    )
    (tmp_path / "trace").mkdir()
    a = train(
        tiny_model, tiny_dataset, tmp_path / "a", *common, env={"SDLORA_TRACE_DIR": str(tmp_path / "trace")}
    )
    assert a.returncode == 0, a.stderr[-3000:]
    setup = next(e for e in read_trace(tmp_path / "trace")[0] if e["event"] == "setup")
    assert setup["frozen_dtype"] == "torch.bfloat16" and setup["lora_dtype"] == "torch.float32"
    assert "precision = bf16" in a.stderr and (tmp_path / "a" / "validation" / "step-4").is_dir()
    stopped = train(tiny_model, tiny_dataset, tmp_path / "b", *common, env={"SDLORA_STOP_AT": "step:5"})
    assert stopped.returncode == 2
    (tmp_path / "b" / "checkpoint-5").rename(tmp_path / "b" / "gone")  # resume from checkpoint-3
    b = train(tiny_model, tiny_dataset, tmp_path / "b", *common, *LATEST)
    assert b.returncode == 0 and same_weights(tmp_path / "a", tmp_path / "b")


# The original toolkit's recipe (its train.sh), shortened: 8-bit Adam, accumulation 2, a checkpoint every 4
# steps with only the newest kept, validation every 2 epochs. kohya's layer set at rank 16 gives some LoRA
# tensors the 4096 elements bitsandbytes needs before it keeps 8-bit state, as every real model's have.
RECIPE = (
    *("--lora_layers", "attn_ff", "--rank", "16"),
    *("--use_8bit_adam", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4"),
    *("--checkpoints_total_limit", "1", "--validation_epochs", "2", "--train_batch_size", "1"),
    *(
        "--validation_prompt",
        "a red circle",
        "--num_validation_images",
        "1",
        "--validation_num_inference_steps",
        "2",
    ),
    *("--max_train_steps", "12", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--random_flip"),
)


def test_the_original_recipe_with_8bit_adam_checkpoints_prunes_validates_and_resumes(
    tmp_path, tiny_model, tiny_dataset
):
    (tmp_path / "trace").mkdir()
    a = train(
        tiny_model, tiny_dataset, tmp_path / "a", *RECIPE, env={"SDLORA_TRACE_DIR": str(tmp_path / "trace")}
    )
    assert a.returncode == 0, a.stderr[-3000:]
    setup = next(e for e in read_trace(tmp_path / "trace")[0] if e["event"] == "setup")
    assert setup["optimizer"] == "AdamW8bit"
    assert [p.name for _, p in list_checkpoints(tmp_path / "a")] == ["checkpoint-12"]  # pruned to the newest
    with safe_open(str(tmp_path / "a" / "checkpoint-12" / OPTIMIZER_FILE), "pt") as f:
        assert "__bnb_optimizer_quant_state__" in f.metadata()["meta"]
        assert any("qmap1" in k for k in f.keys())  # bitsandbytes' 8-bit state, saved as tensors
    # 8 images at batch 1 x accumulation 2: 4 steps an epoch, so validation after epoch 2 (step 8) and at the end.
    assert sorted(p.name for p in (tmp_path / "a" / "validation").iterdir()) == ["step-12", "step-8"]
    killed = run_script(
        script_command(tiny_model, tiny_dataset, tmp_path / "b", *RECIPE), env={"SDLORA_KILL_AT": "step:10"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for _, p in list_checkpoints(tmp_path / "b")] == ["checkpoint-8"]
    b = train(tiny_model, tiny_dataset, tmp_path / "b", *RECIPE, *LATEST)
    assert b.returncode == 0, b.stderr[-3000:]
    assert same_weights(tmp_path / "a", tmp_path / "b")
