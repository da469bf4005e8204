"""What is trained: every layer set x {UNet only, text encoder, DoRA}, trained by the script, its two files
loaded by diffusers and by our loader, kohya's copy and metadata read back, resume with every combination."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LATEST, lora_header, lora_weights, same_weights, train
from diffusers import StableDiffusionPipeline

from sdlora.generation import load_pipeline
from sdlora.lora import LAYER_SETS

pytestmark = pytest.mark.slow

VARIANTS = {"plain": (), "text_encoder": ("--train_text_encoder",), "dora": ("--use_dora",)}


def pixels(pipe, **kwargs) -> np.ndarray:
    kwargs = {
        "num_inference_steps": 3,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
        **kwargs,
    }
    return pipe("a red circle", **kwargs).images


@pytest.fixture(scope="module")
def base_image(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pixels(pipe)


@pytest.mark.parametrize("layers", LAYER_SETS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_layer_set_and_adapter_trains_loads_and_changes_the_image(
    tmp_path, tiny_model, tiny_dataset, base_image, layers, variant
):
    out = tmp_path / "out"
    extra = ("--conv_rank", "2", "--conv_alpha", "1") if layers == "all" else ()
    result = train(
        tiny_model,
        tiny_dataset,
        out,
        *("--max_train_steps", "2", "--learning_rate", "2e-2", "--lora_layers", layers, "--center_crop"),
        *VARIANTS[variant],
        *extra,
        "--text_encoder_lr",
        "1e-2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = lora_weights(out)
    assert any(k.startswith("text_encoder.") for k in keys) == (variant == "text_encoder")
    assert any("magnitude" in k for k in keys) == (variant == "dora")
    assert any(".resnets." in k for k in keys) == (layers == "all")
    assert any(".ff.net." in k for k in keys) == (layers != "attn")

    # diffusers loads our file and the image changes.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    ours = pixels(pipe)
    assert np.abs(ours - base_image).max() > 1e-3
    # Our loader (the notebook's and sdlora.generate's) gives the same image as diffusers.
    loaded, lora = load_pipeline(str(tiny_model), out)
    assert ("text_encoder" in lora.layers) == (variant == "text_encoder")
    assert np.abs(pixels(loaded) - ours).max() < 1e-4
    # The kohya copy, through diffusers' kohya loader: the same image. (That loader drops DoRA's
    # dora_scale with a warning, so there it is checked through our loader, which keeps it.)
    kohya_file = out / "pytorch_lora_weights_kohya.safetensors"
    kohya_keys = lora_weights(out, kohya_file.name)
    assert any(k.startswith("lora_te_") for k in kohya_keys) == (variant == "text_encoder")
    assert any(k.endswith(".dora_scale") for k in kohya_keys) == (variant == "dora")
    if variant == "dora":
        kohya, _ = load_pipeline(str(tiny_model), kohya_file)
    else:
        kohya = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        kohya.set_progress_bar_config(disable=True)
        kohya.load_lora_weights(str(out), weight_name=kohya_file.name)
    assert np.abs(pixels(kohya) - ours).max() < 1e-4

    meta = lora_header(out, kohya_file.name)
    args = json.loads(meta["ss_network_args"])
    assert args["lora_layers"] == layers and ("dora_wd" in args) == (variant == "dora")
    if layers == "all":
        assert args["conv_dim"] == "2" and args["conv_alpha"] == "1.0"
        alphas = {k: float(v) for k, v in kohya_keys.items() if k.endswith(".alpha")}
        assert alphas["lora_unet_down_blocks_0_resnets_0_conv1.alpha"] == 1.0
        assert alphas["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] == 4.0
        assert kohya_keys["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0] == 2
    assert meta["ss_text_encoder_lr"] == ("0.01" if variant == "text_encoder" else "0")
    assert meta["sdlora_adapter"] == {"dora": "DoRA", "plain": "LoCon" if layers == "all" else "LoRA"}.get(
        variant, "LoCon" if layers == "all" else "LoRA"
    )


def test_every_combination_resumes_exactly(tmp_path, tiny_model, tiny_dataset):
    common = (
        *(
            "--max_train_steps",
            "6",
            "--checkpointing_steps",
            "3",
            "--lora_layers",
            "all",
            "--train_text_encoder",
        ),
        *("--use_dora", "--lora_dropout", "0.1", "--random_flip", "--unet_lr", "3e-3"),
    )
    straight = train(tiny_model, tiny_dataset, tmp_path / "a", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert straight.stderr.count("text embeddings not cached") == 1
    stopped = train(tiny_model, tiny_dataset, tmp_path / "b", *common, env={"SDLORA_STOP_AT": "step:4"})
    assert stopped.returncode == 2
    (tmp_path / "b" / "checkpoint-4").rename(tmp_path / "b" / "gone")  # resume from checkpoint-3
    resumed = train(tiny_model, tiny_dataset, tmp_path / "b", *common, *LATEST)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_weights(tmp_path / "a", tmp_path / "b")
    other = train(
        tiny_model,
        tiny_dataset,
        tmp_path / "b",
        *common[:-6],
        *LATEST,
        "--max_train_steps",
        "8",
    )
    assert other.returncode == 2 and "adapter: checkpoint 'DoRA', now 'LoCon'" in other.stderr


def test_explicit_target_modules_adapt_only_those_layers(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    result = train(
        tiny_model, tiny_dataset, out, "--max_train_steps", "1", "--lora_target_modules", "to_q", "to_v"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    layers = {k.split(".lora")[0].rsplit(".", 1)[1] for k in lora_weights(out)}
    assert layers == {"to_q", "to_v"}
    assert json.loads(lora_header(out)["ss_network_args"])["target_modules"] == ["to_q", "to_v"]


def test_gradient_checkpointing_with_the_text_encoder_trains_the_same_weights(
    tmp_path, tiny_model, tiny_dataset
):
    from conftest import read_trace

    common = ("--max_train_steps", "2", "--train_text_encoder", "--center_crop")
    switched_on = {}
    for name, extra in (("plain", ()), ("checkpointed", ("--gradient_checkpointing",))):
        (tmp_path / f"trace-{name}").mkdir()
        result = train(
            tiny_model,
            tiny_dataset,
            tmp_path / name,
            *common,
            *extra,
            env={"SDLORA_TRACE_DIR": str(tmp_path / f"trace-{name}")},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (events,) = read_trace(tmp_path / f"trace-{name}").values()
        setup = next(e for e in events if e["event"] == "setup")
        switched_on[name] = (setup["gradient_checkpointing"], setup["text_encoder_gradient_checkpointing"])
    # It is really on (the modules' own flags), and changes nothing but the memory.
    assert switched_on == {"plain": (False, [False]), "checkpointed": (True, [True])}
    a, b = lora_weights(tmp_path / "plain"), lora_weights(tmp_path / "checkpointed")
    assert any(k.startswith("text_encoder.") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
