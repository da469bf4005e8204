"""LoHa and LoKr (--network_type loha|lokr): the saved LyCORIS file applies in the clients exactly as peft trained
it (ComfyUI's formulas, re-implemented here), trains and changes the images our loader makes, resumes bit for
bit, carries LyCORIS's keys and header, goes through lora_tools, and is refused in one line where it cannot work."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import LATEST, lora_header, lora_weights, same_weights, train
from test_train_script import ok

SHORT = ("--max_train_steps", "3", "--checkpointing_steps", "2", "--center_crop", "--lora_layers", "all")
FLAGS = {  # LoHa with the text encoder; LoKr with a rank small enough for both factors to be low-rank
    "loha": (
        "--network_type",
        "loha",
        "--train_text_encoder",
        "--rank_dropout",
        "0.1",
        "--module_dropout",
        "0.1",
    ),
    "lokr": (
        "--network_type",
        "lokr",
        "--lokr_factor",
        "4",
        "--rank",
        "1",
        "--lora_alpha",
        "0.5",
        "--decompose_both",
    ),
}


# --- the clients' formulas ---------------------------------------------------------------------------
# Written from ComfyUI 0.8.0's comfy/weight_adapter/loha.py and lokr.py (calculate_weight; the alpha comes from
# `<name>.alpha` as comfy/lora.py reads it), which A1111's extensions-builtin/Lora/network_lokr.py and LyCORIS's
# lycoris/modules/{loha,lokr}.py compute alike.


def _tucker(t, w_b, w_a):  # (r, r, kh, kw), (r, in), (r, out) -> (out, in, kh, kw)
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)


def client_delta(f: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """What ComfyUI adds to a weight of `shape` at strength 1, from one module's tensors in LyCORIS's file."""
    f = {k: v.double() for k, v in f.items()}
    alpha = f["alpha"].item() if "alpha" in f else None
    if "hada_w1_a" in f:
        scale = alpha / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
        if "hada_t1" in f:
            m1 = _tucker(f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            m2 = _tucker(f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        return scale * (m1 * m2).reshape(shape)
    dim = None
    w1 = f.get("lokr_w1")
    if w1 is None:
        dim, w1 = f["lokr_w1_b"].shape[0], f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f.get("lokr_w2")
    if w2 is None:
        dim = f["lokr_w2_b"].shape[0]
        w2 = (
            _tucker(f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
            if "lokr_t2" in f
            else f["lokr_w2_a"] @ f["lokr_w2_b"]
        )
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    # (contiguous as LyCORIS's functional/lokr.py make_kron: ComfyUI's kron of a Tucker core fails, so the
    # trainer refuses --use_tucker with lokr; a LoKr with Tucker convs from elsewhere still reads here)
    return scale * torch.kron(w1, w2.contiguous()).reshape(shape)


@pytest.fixture(scope="module")
def tiny_base(tiny_model):
    from sdlora.models import load_base_model

    return load_base_model(str(tiny_model))


@pytest.mark.parametrize(
    "spec",
    [
        dict(network="loha", rank=4, alpha=2.0),
        dict(network="loha", rank=2, alpha=3.0, conv_rank=3, conv_alpha=1.0, use_tucker=True),
        dict(network="lokr", rank=8, alpha=2.0),  # every factor full: scale 1 in LyCORIS and the clients
        dict(network="lokr", rank=2, alpha=1.0, lokr_factor=2),  # w2 low-rank
        dict(
            network="lokr", rank=1, alpha=3.0, decompose_both=True, use_tucker=True
        ),  # both low-rank, Tucker
    ],
    ids=["loha", "loha-tucker", "lokr-full", "lokr-factor2", "lokr-both-tucker"],
)
def test_the_lycoris_file_applies_in_the_clients_as_peft_trained_it(tmp_path, tiny_base, spec):
    from peft.tuners.lycoris_utils import LycorisLayer
    from safetensors.torch import load_file

    from sdlora.kohya import kohya_module_name
    from sdlora.lora import AdapterSpec, add_adapters, save_lora_files
    from sdlora.lora_files import read_lora

    base = copy.deepcopy(tiny_base)  # (the adapters go onto the copy)
    models = add_adapters(base, AdapterSpec(layers="all", text_encoder=True, **spec), seed=0)
    generator = torch.Generator().manual_seed(0)
    for model in models.values():  # every factor random (peft starts one at zero), so every term counts
        for param in model.parameters():
            if param.requires_grad:
                param.data = torch.randn(param.shape, generator=generator) * 0.3
    save_lora_files(models, base.family, tmp_path, {})
    file = load_file(str(tmp_path / "pytorch_lora_weights_kohya.safetensors"))
    ours = read_lora(tmp_path)  # our loader, from the other file
    worst, kinds = 0.0, set()
    for part, model in models.items():
        for name, layer in model.named_modules():
            if not isinstance(layer, LycorisLayer):
                continue
            weight = layer.get_base_layer().weight
            trained = layer.get_delta_weight("default").double()  # what peft adds in training
            module = name if part == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            prefix = kohya_module_name(part, module) + "."
            tensors = {k.removeprefix(prefix): v for k, v in file.items() if k.startswith(prefix)}
            worst = max(worst, (client_delta(tensors, weight.shape) - trained).abs().max().item())
            read = ours.delta(part, module).double().reshape(weight.shape)  # our loader's delta
            worst = max(worst, (read - trained).abs().max().item())
            kinds.add("linear" if weight.ndim == 2 else f"conv{weight.shape[-1]}x{weight.shape[-1]}")
    assert kinds == {"linear", "conv1x1", "conv3x3"}, kinds
    print(f"max abs difference {worst:.2e}")
    assert worst < 1e-5, worst


# --- through the trainer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_dataset):
    """{network: output folder} of a 3-step run each, with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("lycoris")
    for network, flags in FLAGS.items():
        ok(train(tiny_model, tiny_dataset, root / network, *SHORT, *flags))
    return {network: root / network for network in FLAGS}


def _images(pipe, scales):
    from sdlora.generation import generate_at_scales

    images = generate_at_scales(pipe, "a red circle", scales, num_inference_steps=4, height=64, width=64)
    return [np.asarray(image, dtype=np.float64) for image in images]


@pytest.mark.slow
@pytest.mark.parametrize("network", FLAGS)
def test_a_trained_loha_or_lokr_changes_the_images_our_loader_makes_by_its_scale(
    trained, tiny_model, network
):
    from sdlora.generation import load_pipeline

    (base,) = _images(load_pipeline(str(tiny_model), None, device="cpu", dtype="float32")[0], [1.0])
    for file in ("", "pytorch_lora_weights_kohya.safetensors"):  # ours (the folder's), LyCORIS's
        pipe, lora = load_pipeline(str(tiny_model), trained[network] / file, device="cpu", dtype="float32")
        assert lora.describe().startswith({"loha": "LoHa", "lokr": "LoKr"}[network]), lora.describe()
        off, on, strong = _images(pipe, [0.0, 1.0, 4.0])
        assert np.array_equal(off, base)  # scale 0: the base model alone
        assert 0 < np.abs(on - base).mean() < np.abs(strong - base).mean()


@pytest.mark.slow
@pytest.mark.parametrize("network", FLAGS)
def test_the_files_hold_lycoris_keys_under_kohya_names_and_its_header(trained, network):
    kohya = lora_weights(trained[network], "pytorch_lora_weights_kohya.safetensors")
    ours = lora_weights(trained[network])
    names = {
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "lokr": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    }
    # kohya's module names: diffusers paths for SD 1.x, the text encoder under text_model; a 3x3 conv too
    for module in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        *(["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] if network == "loha" else []),
    ):
        assert {k.removeprefix(module + ".") for k in kohya if k.startswith(module + ".")} == names[
            network
        ] | {"alpha"}
    assert {k.rsplit(".", 1)[1] for k in kohya} == names[network] | {"alpha"}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in ours) and len(ours) == len(kohya)
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        header = lora_header(trained[network], name)
        args = json.loads(header["ss_network_args"])
        assert header["ss_network_module"] == "lycoris.kohya" and args["algo"] == network
        assert args["conv_dim"] == header["ss_network_dim"] == ("4" if network == "loha" else "1")
        assert header["sdlora_adapter"] == {"loha": "LoHa", "lokr": "LoKr"}[network]
    if network == "lokr":
        assert (
            args["factor"] == "4" and args["decompose_both"] == "True" and header["ss_network_alpha"] == "0.5"
        )
    else:
        assert args["rank_dropout"] == "0.1" and args["module_dropout"] == "0.1"


@pytest.mark.slow
@pytest.mark.parametrize("network", FLAGS)
def test_a_loha_or_lokr_run_resumes_bit_for_bit(tmp_path, trained, tiny_model, tiny_dataset, network):
    flags = (*SHORT, *FLAGS[network])
    stopped = train(tiny_model, tiny_dataset, tmp_path, *flags, env={"SDLORA_STOP_AT": "step:2"})
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    ok(train(tiny_model, tiny_dataset, tmp_path, *flags, *LATEST))
    assert same_weights(tmp_path, trained[network])
    assert same_weights(tmp_path / "checkpoint-2", trained[network] / "checkpoint-2")
