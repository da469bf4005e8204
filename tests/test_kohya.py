"""LoRA files in both formats (sdlora.lora_weights, sdlora.kohya) on the tiny SD 1.x, SD 2.x and SDXL models.

For each layer set (attn, attn_ff, all with a separate conv rank) with the UNet alone, with the text
encoder(s), and with DoRA: the diffusers file loads in diffusers as the adapted models generate, the
kohya file loads in diffusers' kohya loader to the same image, and both read back to the same tensors.
Helpers here (tiny_pipeline, make_weights, image) are also used by test_lora_tools.py.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.kohya import (
    SD_NAMES,
    SDXL_LAYOUT,
    SDXL_NAMES,
    SgmLayout,
    kohya_module_name,
    module_from_kohya_name,
)
from sdlora.lora_files import read_lora
from sdlora.lora_weights import (
    LoraWeights,
    weights_from_models,
    write_diffusers,
    write_kohya,
)

FAMILIES = ("sd1", "sd2", "sdxl")
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
# kohya's default: every Linear and 1x1 conv inside the UNet's transformer blocks
ATTN_FF = ATTN + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# LoCon: ResNet convs, time embedding projections and the samplers' convs too ("conv" = sampler convs)
ALL = ATTN_FF + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]
LAYERS = {"attn": ATTN, "attn_ff": ATTN_FF, "all": ALL}
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TE_LAYERS = {"attn": TE_ATTN, "attn_ff": TE_ATTN + ["fc1", "fc2"], "all": TE_ATTN + ["fc1", "fc2"]}
VARIANTS = ("unet", "text_encoders", "dora")  # UNet only; UNet and text encoder(s); DoRA on both
RANK, ALPHA, CONV_RANK, CONV_ALPHA, TE_ALPHA = 4, 8.0, 2, 1.0, 2.0
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# --- helpers ----------------------------------------------------------------------------------------


_MODELS: dict = {}


def tiny_pipeline(family: str, root: Path):
    """(model folder, pipeline) of the tiny model of a family: the folder is built once per test session, the
    pipeline is a fresh one each time (loading and deleting adapters does not always restore a pipeline
    exactly, and a test must not see another's leftovers)."""
    from diffusers import DiffusionPipeline

    from sdlora.tiny_model import save_tiny_model

    if family not in _MODELS:
        _MODELS[family] = save_tiny_model(root / f"tiny-{family}", family=family)
    pipe = DiffusionPipeline.from_pretrained(_MODELS[family])
    pipe.set_progress_bar_config(disable=True)
    return _MODELS[family], pipe


def image(pipe, **kwargs) -> np.ndarray:
    """One 2-step image at the native size, fixed prompt and seed, as floats in [0, 1]."""
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        return pipe(
            "a red circle", num_inference_steps=2, generator=generator, output_type="np", **kwargs
        ).images[0]


def adapted_models(pipe, layers: str, variant: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Copies of the pipeline's UNet (and text encoders) with a peft adapter of random, non-zero weights."""
    from peft import LoraConfig

    dora = variant == "dora"
    conv = {name: CONV_RANK for name in ("conv1", "conv2", "conv")} if layers == "all" else {}
    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(
        LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            init_lora_weights="gaussian",
            target_modules=LAYERS[layers],
            rank_pattern=conv,
            alpha_pattern={name: CONV_ALPHA for name in conv},
            use_dora=dora,
        )
    )
    models = {"unet": unet}
    for part in TEXT_ENCODERS if variant != "unet" else ():
        if getattr(pipe, part, None) is not None:
            encoder = copy.deepcopy(getattr(pipe, part))
            encoder.add_adapter(
                LoraConfig(r=RANK, lora_alpha=TE_ALPHA, target_modules=TE_LAYERS[layers], use_dora=dora)
            )
            models[part] = encoder
    generator = torch.Generator().manual_seed(seed + 1)
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the LoRA change the output
                param.data = 0.1 * torch.randn(param.shape, generator=generator)
            elif "lora_magnitude_vector" in name:  # and DoRA's magnitude differ from the weights' norms
                param.data = param.data * (1 + 0.1 * torch.randn(param.shape, generator=generator))
    return models


def make_weights(pipe, layers: str, variant: str, seed: int = 0, **metadata: str) -> LoraWeights:
    return weights_from_models(adapted_models(pipe, layers, variant, seed), metadata=metadata)


def with_models(pipe, models: dict[str, torch.nn.Module]):
    """The pipeline with some of its models replaced (by adapted copies)."""
    pipe = type(pipe)(**{**pipe.components, **models})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_weights(a: LoraWeights, b: LoraWeights) -> None:
    assert a.parts.keys() == b.parts.keys()
    for part in a.parts:
        assert a.parts[part].keys() == b.parts[part].keys(), part
        for key, tensor in a.parts[part].items():
            assert torch.equal(tensor, b.parts[part][key]), key
    assert a.alphas == b.alphas
    assert a.family == b.family


def write_both(weights: LoraWeights, folder: Path) -> tuple[Path, Path]:
    return (
        write_diffusers(weights, folder / "pytorch_lora_weights.safetensors"),
        write_kohya(weights, folder / "pytorch_lora_weights_kohya.safetensors"),
    )


def loaded_image(pipe, folder: Path, weight_name: str | None = None) -> np.ndarray:
    """The image with a LoRA loaded through diffusers' load_lora_weights, which is then removed again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="test")
    try:
        return image(pipe)
    finally:
        pipe.delete_adapters("test")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def base_images(models_root) -> dict[str, np.ndarray]:
    return {family: image(tiny_pipeline(family, models_root)[1]) for family in FAMILIES}


# --- round trips: cheap, every combination ----------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_both_files_read_back_to_the_same_tensors_and_alphas(family, layers, variant, models_root, tmp_path):
    pipe = tiny_pipeline(family, models_root)[1]
    weights = make_weights(pipe, layers, variant, ss_output_name="mine")
    assert weights.family.name == family
    if layers == "all":  # the conv rank and alpha differ from the others', per module
        conv1 = "down_blocks.0.resnets.0.conv1"
        assert weights.rank("unet", conv1) == CONV_RANK and weights.alphas["unet"][conv1] == CONV_ALPHA
    diffusers_file, kohya_file = write_both(weights, tmp_path)
    for file in (diffusers_file, kohya_file):
        back = read_lora(file)
        assert_same_weights(back, weights)
        assert back.metadata["ss_output_name"] == "mine"
    # and across formats: kohya -> diffusers -> read gives the same again
    write_diffusers(read_lora(kohya_file), tmp_path / "again.safetensors")
    assert_same_weights(read_lora(tmp_path / "again.safetensors"), weights)


def test_kohya_names_alphas_and_header_are_what_kohya_writes(models_root, tmp_path):
    pipe = tiny_pipeline("sd1", models_root)[1]
    _, kohya_file = write_both(make_weights(pipe, "all", "text_encoders"), tmp_path)
    state = load_file(str(kohya_file))
    with safe_open(str(kohya_file), framework="pt") as f:
        header = f.metadata()
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{conv1}.lora_down.weight"].shape == (CONV_RANK, 32, 3, 3)  # LoCon: (rank, in, kh, kw)
    assert state[f"{conv1}.lora_up.weight"].shape == (32, CONV_RANK, 1, 1)
    alpha = state[f"{conv1}.alpha"]
    assert alpha.dtype == torch.float32 and alpha.ndim == 0 and alpha.item() == CONV_ALPHA
    assert state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == ALPHA
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state  # not lora_te1_
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in state
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == (str(RANK), str(ALPHA))
    assert json.loads(header["ss_network_args"]) == {
        "conv_dim": str(CONV_RANK),
        "conv_alpha": str(CONV_ALPHA),
    }
    assert header["ss_base_model_version"] == "sd_v1"


def test_sdxl_kohya_file_uses_sgm_block_names_and_diffusers_maps_them_back(models_root, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    pipe = tiny_pipeline("sdxl", models_root)[1]
    weights = make_weights(pipe, "all", "text_encoders")
    _, kohya_file = write_both(weights, tmp_path)
    state = load_file(str(kohya_file))
    assert {k.split("_")[1] for k in state if not k.startswith("lora_unet_")} == {"te1", "te2"}
    for name in (  # (layers_per_block 2: input block 1 + 3 * level + layer; output 3 * level + layer)
        "lora_unet_input_blocks_1_0_in_layers_2",  # down_blocks.0.resnets.0.conv1
        "lora_unet_input_blocks_3_0_op",  # down_blocks.0.downsamplers.0.conv
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_2",  # down_blocks.2.attentions.1, 2nd layer
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_middle_block_2_emb_layers_1",  # mid_block.resnets.1.time_emb_proj
        "lora_unet_output_blocks_2_2_conv",  # up_blocks.0.upsamplers.0.conv
        "lora_unet_output_blocks_5_0_skip_connection",  # up_blocks.1.resnets.2.conv_shortcut
        "lora_unet_output_blocks_8_0_out_layers_3",  # up_blocks.2.resnets.2.conv2
    ):
        assert f"{name}.lora_down.weight" in state, name
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in state)
    # diffusers' own SGM reader (the inverse) puts every tensor on the module it came from
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=pipe.unet.config)
    unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    assert unet.keys() == weights.parts["unet"].keys()
    assert all(torch.equal(unet[k], weights.parts["unet"][k]) for k in unet)


@pytest.mark.parametrize(
    "layout",
    [SDXL_LAYOUT, SgmLayout(1, frozenset({1})), SgmLayout(3, frozenset({0, 2}))],
    ids=["sdxl", "one-layer-no-attention-up0", "three-layers"],
)
def test_sgm_names_map_back_to_the_same_module_for_any_layout(layout):
    per_level = layout.layers_per_block
    modules = ["conv_in", "time_embedding.linear_1", "add_embedding.linear_2", "conv_out"]
    for block in range(3):
        for layer in range(per_level):
            modules += [
                f"down_blocks.{block}.resnets.{layer}.conv1",
                f"down_blocks.{block}.attentions.{layer}.proj_in",
            ]
        modules.append(f"down_blocks.{block}.downsamplers.0.conv")
        for layer in range(per_level + 1):
            modules += [
                f"up_blocks.{block}.resnets.{layer}.conv_shortcut",
                f"up_blocks.{block}.attentions.{layer}.transformer_blocks.1.attn2.to_out.0",
            ]
        modules.append(f"up_blocks.{block}.upsamplers.0.conv")
    modules += [
        "mid_block.resnets.0.time_emb_proj",
        "mid_block.attentions.0.proj_out",
        "mid_block.resnets.1.conv2",
    ]
    names = {kohya_module_name("unet", m, SDXL_NAMES.with_layout(layout)) for m in modules}
    assert len(names) == len(modules)  # no two modules share a name
    for module in modules:
        name = kohya_module_name("unet", module, SDXL_NAMES.with_layout(layout))
        assert module_from_kohya_name(name, layout) == ("unet", module), name
    # an up level without attention puts its upsampler second in SGM (as in SD 1.x's output_blocks.2.1.conv)
    assert kohya_module_name(
        "unet", "up_blocks.0.upsamplers.0.conv", SDXL_NAMES.with_layout(SgmLayout(1, frozenset({1})))
    ) == ("lora_unet_output_blocks_1_1_conv")


def test_lycoris_dora_scale_gives_the_weight_peft_merges(models_root):
    """dora_scale as LyCORIS writes it (per output row): its formula gives peft's merged DoRA weight."""
    from sdlora.kohya import to_kohya

    pipe = tiny_pipeline("sd1", models_root)[1]
    models = adapted_models(pipe, "all", "dora")
    weights = weights_from_models(models)
    state = to_kohya(weights.parts, weights.alphas, SD_NAMES)
    for module in ("down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"):
        name = kohya_module_name("unet", module, SD_NAMES)
        layer = models["unet"].get_submodule(module)
        base = layer.get_base_layer().weight.detach().clone()
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        alpha, scale = state[f"{name}.alpha"], state[f"{name}.dora_scale"]
        assert scale.shape == (base.shape[0],) + (1,) * (base.ndim - 1)
        # LyCORIS (wd_on_out): W' = dora_scale * (W + alpha/r up@down) / ||row of (W + alpha/r up@down)||
        merged = base + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        norm = merged.flatten(1).norm(dim=1).reshape(scale.shape)
        expected = scale * merged / norm
        layer.merge()
        try:
            assert torch.allclose(layer.get_base_layer().weight, expected, atol=1e-5)
        finally:
            layer.unmerge()


# --- images: the files load in diffusers as the adapted models generate ------------------------------

IMAGE_CASES = [
    ("sd1", "attn", "unet"),
    ("sd1", "all", "text_encoders"),
    ("sd2", "attn_ff", "text_encoders"),
    ("sd2", "all", "unet"),
    ("sdxl", "attn_ff", "unet"),
    ("sdxl", "all", "text_encoders"),
]
TOLERANCE = 3e-5  # on output_type="np" floats in [0, 1]


@pytest.mark.parametrize("family,layers,variant", IMAGE_CASES)
def test_diffusers_and_kohya_files_load_in_diffusers_as_trained(
    family, layers, variant, models_root, base_images, tmp_path
):
    pipe = tiny_pipeline(family, models_root)[1]
    models = adapted_models(pipe, layers, variant)
    trained = image(with_models(pipe, models))
    diffusers_file, kohya_file = write_both(weights_from_models(models), tmp_path)
    from_diffusers_file = loaded_image(pipe, tmp_path)
    assert np.abs(trained - base_images[family]).max() > 1e-2  # the LoRA visibly changes the image
    assert (
        np.abs(from_diffusers_file - trained).max() < TOLERANCE
    )  # alphas, conv ranks, text encoders all applied
    from_kohya_file = loaded_image(pipe, tmp_path, weight_name=kohya_file.name)
    assert np.abs(from_kohya_file - trained).max() < TOLERANCE


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dora_diffusers_file_loads_as_trained_and_kohya_dora_reads_back(family, models_root, tmp_path):
    """diffusers' kohya loader drops dora_scale (with a warning): the kohya DoRA file loads there as plain
    LoRA; our reader keeps it, and converted to the diffusers format it gives the trained image."""
    pipe = tiny_pipeline(family, models_root)[1]
    models = adapted_models(pipe, "all", "dora")
    trained = image(with_models(pipe, models))
    weights = weights_from_models(models)
    diffusers_file, kohya_file = write_both(weights, tmp_path)
    assert np.abs(loaded_image(pipe, tmp_path) - trained).max() < TOLERANCE
    write_diffusers(read_lora(kohya_file), tmp_path / "converted" / "pytorch_lora_weights.safetensors")
    assert np.abs(loaded_image(pipe, tmp_path / "converted") - trained).max() < TOLERANCE
    # diffusers' kohya path: down/up land on the right modules, the magnitudes are left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(tmp_path), weight_name=kohya_file.name, adapter_name="test")
    try:
        for part, tensors in weights.parts.items():
            model = getattr(pipe, part)
            for key, tensor in list(tensors.items())[:12]:
                if key.endswith(".lora_A.weight"):
                    module = key.removesuffix(".lora_A.weight")
                    if part != "unet" and not hasattr(model, "text_model"):
                        module = module.removeprefix("text_model.")
                    assert torch.equal(model.get_submodule(module).lora_A["test"].weight, tensor), key
            assert not any(getattr(m, "use_dora", {}).get("test") for m in model.modules())
    finally:
        pipe.delete_adapters("test")
