"""One trainer for every family: SD 2.x (v-prediction) and SDXL trained, killed and resumed, loaded in their
own pipelines and through kohya's copies, sampled right, and SDXL's size/crop conditioning from the buckets."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from conftest import (
    LATEST,
    lora_header,
    lora_weights,
    run_script,
    same_weights,
    script_command,
    train,
)
from diffusers import DiffusionPipeline

from sdlora.checkpoints import list_checkpoints
from sdlora.generation import generate, inference_scheduler, load_pipeline

pytestmark = pytest.mark.slow


def pixels(pipe, **kwargs) -> np.ndarray:
    kwargs = {
        "num_inference_steps": 2,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
        **kwargs,
    }
    return pipe("a red circle", **kwargs).images


def family_pipeline(model):
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_files(model, out, kohya_prefixes):
    """Both files load in the family's own pipeline, change its image, and give the same image."""
    base = pixels(family_pipeline(model))
    pipe = family_pipeline(model)
    pipe.load_lora_weights(str(out))
    ours = pixels(pipe)
    assert np.abs(ours - base).max() > 1e-3
    kohya = family_pipeline(model)
    kohya.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    assert np.abs(pixels(kohya) - ours).max() < 1e-4
    keys = lora_weights(out, "pytorch_lora_weights_kohya.safetensors")
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in keys} == set(kohya_prefixes)
    return keys


SD2_RUN = ("--max_train_steps", "6", "--checkpointing_steps", "3", "--random_flip", "--train_text_encoder")


def test_sd2_trains_with_v_prediction_resumes_and_samples_as_v(tmp_path, tiny_sd2, tiny_dataset):
    a = train(tiny_sd2, tiny_dataset, tmp_path / "a", *SD2_RUN)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "resolution = 96" in a.stderr  # SD 2's native size (768 for the real one)
    assert json.loads((tmp_path / "a" / "args.json").read_text())["prediction_type"] == "v_prediction"
    meta = lora_header(tmp_path / "a", "pytorch_lora_weights_kohya.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_v" and meta["ss_v2"] == "True"
    assert (
        meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
        and meta["modelspec.prediction_type"] == "v"
    )
    check_files(tiny_sd2, tmp_path / "a", {"lora_unet", "lora_te"})
    # Killed (SIGKILL) after step 5, then resumed from checkpoint-3: bit for bit the uninterrupted run.
    killed = run_script(
        script_command(tiny_sd2, tiny_dataset, tmp_path / "b", *SD2_RUN), env={"SDLORA_KILL_AT": "step:5"}
    )
    assert killed.returncode == -signal.SIGKILL and list_checkpoints(tmp_path / "b")[-1][0] == 3
    b = train(tiny_sd2, tiny_dataset, tmp_path / "b", *SD2_RUN, *LATEST)
    assert b.returncode == 0 and same_weights(tmp_path / "a", tmp_path / "b")
    # Sampled with v-prediction, as trained: not the same image as the same LoRA sampled as epsilon.
    pipe, _ = load_pipeline(str(tiny_sd2), tmp_path / "a")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    as_v = np.asarray(generate(pipe, "a red circle", num_inference_steps=3)[0], dtype=int)
    pipe.scheduler = inference_scheduler(str(tiny_sd2), "epsilon")
    as_eps = np.asarray(generate(pipe, "a red circle", num_inference_steps=3)[0], dtype=int)
    assert np.abs(as_v - as_eps).mean() > 1


def test_a_lora_for_another_family_is_refused_naming_both(tmp_path, tiny_model, tiny_sdxl, tiny_dataset):
    from sdlora.errors import UserError

    assert train(tiny_model, tiny_dataset, tmp_path / "sd1", "--max_train_steps", "1").returncode == 0
    with pytest.raises(UserError, match=r"a LoRA for SD 1\.x, but .* is SDXL"):
        load_pipeline(str(tiny_sdxl), tmp_path / "sd1")


def test_sdxl_time_ids_follow_each_images_size_bucket_crop_and_flip(tiny_sdxl):
    from sdlora.buckets import BucketSettings
    from sdlora.caption_controls import CaptionControls
    from sdlora.data import Augment, TrainImages
    from sdlora.models import load_base_model
    from sdlora.training.conditioning import Conditioning

    base = load_base_model(str(tiny_sdxl))
    images = TrainImages([{}], "image", ["a"], Augment(0, True), CaptionControls())
    images.sizes = [(300, 180)]  # a landscape photo
    images.place(BucketSettings("bucket", 128, 32, 64, 256))
    p = images.placements[0]
    assert p.bucket == (160, 96) and p.original == (300, 180)
    left, top = p.crop
    conditioning = Conditioning(base, images, None, None, base.text_encoders, "cpu", torch.float32)
    batch = {"index": torch.tensor([0, 0]), "flip": torch.tensor([False, True]), "crop": [p.crop, p.crop]}
    batch["caption"] = ["a", "a"]
    ids = conditioning.denoiser_inputs(batch)["added_cond_kwargs"]["time_ids"].tolist()
    # (original h, w, crop top, left, target h, w); a flipped picture's crop corner is mirrored.
    assert ids[0] == [180, 300, top, left, 96, 160]
    assert ids[1] == [180, 300, top, p.resized[0] - left - 160, 96, 160]


@pytest.mark.parametrize("family,size", [("sd2", 96), ("sdxl", 128)])
def test_the_notebook_runs_headless_on_each_family(tmp_path, request, tiny_dataset, kernel, family, size):
    from PIL import Image
    from test_inference import displayed_images, run_notebook

    model = request.getfixturevalue(f"tiny_{family}")
    lora = train(model, tiny_dataset, tmp_path / "lora", "--max_train_steps", "2", "--learning_rate", "1e-2")
    assert lora.returncode == 0, lora.stderr[-3000:]
    params = {
        "base_model": str(model),
        "lora_path": str(tmp_path / "lora"),
        "prompts": ["a red circle"],
        "output_dir": str(tmp_path / "results"),
        "num_images": 1,
        "num_inference_steps": 2,
    }
    nb = run_notebook(kernel, params)
    (png,) = (tmp_path / "results").rglob("image_0.png")
    assert Image.open(png).size == (size, size)  # the family's native size (768 / 1024 for the real ones)
    assert len(displayed_images(nb)) == 3  # the grid, the side-by-side and the scale sweep
