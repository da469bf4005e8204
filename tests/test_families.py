"""Families: each tiny model is recognised, and each family's conditioning has the shapes its UNet takes."""

from __future__ import annotations

import pytest
import torch

from sdlora.families import SD1, SD2, SDXL, Geometry, detect_family, time_ids
from sdlora.models import load_base_model, native_resolution


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_model):
    from sdlora.tiny_model import save_tiny_model

    root = tmp_path_factory.mktemp("families")
    return {
        "sd1": tiny_model,
        "sd2": save_tiny_model(root / "tiny-sd2", family="sd2"),
        "sdxl": save_tiny_model(root / "tiny-sdxl", family="sdxl"),
    }


def test_each_family_is_detected_with_its_native_size(tiny_models):
    assert {name: detect_family(str(path)) for name, path in tiny_models.items()} == {
        "sd1": SD1,
        "sd2": SD2,
        "sdxl": SDXL,
    }
    assert {name: native_resolution(str(path)) for name, path in tiny_models.items()} == {
        "sd1": 64,
        "sd2": 96,
        "sdxl": 128,
    }


def test_each_family_names_its_base_model_as_kohya_and_the_model_spec_do():
    assert SD1.base_model_version("epsilon") == "sd_v1"
    assert (
        SD2.base_model_version("v_prediction") == "sd_v2_v" and SD2.base_model_version("epsilon") == "sd_v2"
    )
    assert SDXL.base_model_version("epsilon") == "sdxl_base_v1-0"
    assert SDXL.modelspec_architecture("epsilon") == "stable-diffusion-xl-v1-base/lora"
    assert SD2.modelspec_architecture("v_prediction") == "stable-diffusion-v2-768-v/lora"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_conditioning_drives_the_family_unet(tiny_models, family):
    base = load_base_model(str(tiny_models[family]))
    text = base.encode_prompts(["a red circle", "a blue square"], "cpu")
    geometry = [Geometry((96, 128), (0, 16), (64, 64))] * 2
    inputs = base.family.denoiser_inputs(text, geometry, "cpu", torch.float32)
    out = base.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), **inputs).sample
    assert out.shape == (2, 4, 8, 8)
    if family == "sdxl":
        # Both encoders' penultimate states side by side, and the second one's pooled output.
        assert text["prompt_embeds"].shape == (2, 77, 64) and text["pooled"].shape == (2, 32)
        first = {k: v[:1] for k, v in text.items()}
        with torch.no_grad():
            other = base.unet(
                torch.zeros(1, 4, 8, 8),
                10,
                **base.family.denoiser_inputs(
                    first, [Geometry((128, 128), (0, 0), (64, 64))], "cpu", torch.float32
                ),
            ).sample
            same = base.unet(
                torch.zeros(1, 4, 8, 8),
                10,
                **base.family.denoiser_inputs(first, geometry[:1], "cpu", torch.float32),
            ).sample
        assert not torch.allclose(other, same)  # the size/crop conditioning reaches the UNet
    else:
        assert set(text) == {"prompt_embeds"} and text["prompt_embeds"].shape == (2, 77, 32)


def test_sdxl_time_ids_are_height_width_first():
    # StableDiffusionXLPipeline: original (h, w) + crop (top, left) + target (h, w); ours take (w, h) and (left, top).
    assert time_ids((640, 480), (16, 8), (512, 384)) == (480, 640, 8, 16, 384, 512)


def test_the_trainer_loads_the_unet_with_pytorch_sdpa_attention(tiny_model):
    from sdlora.config import parse_train_config
    from sdlora.training.settings import derive_settings
    from sdlora.training.setup import load_model

    cfg = parse_train_config("", ["--pretrained_model_name_or_path", str(tiny_model), "--dataset_from_disk"])
    base = load_model(cfg.model, cfg.speed, False, torch.device("cpu"), torch.float32)
    # AttnProcessor2_0 is diffusers' processor that calls F.scaled_dot_product_attention.
    assert {type(p).__name__ for p in base.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    accelerator = type("Launch", (), {"mixed_precision": "no", "num_processes": 1})()
    settings = derive_settings(cfg, base, accelerator, None)
    assert settings.resolution == 64 and settings.prediction_type == "epsilon"
