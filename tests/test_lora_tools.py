"""`python -m sdlora.lora_tools`: info, convert, resize, merge and fuse on the tiny models' LoRAs, and bad input.

The commands run in-process through main() (one real subprocess checks `python -m sdlora.lora_tools info`);
the LoRAs come from test_kohya's helpers: random non-zero adapters on the tiny models, both formats.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file, save_file
from test_kohya import (
    TOLERANCE,
    assert_same_weights,
    image,
    loaded_image,
    make_weights,
    tiny_pipeline,
    write_both,
)

from sdlora.errors import run_cli
from sdlora.lora_files import read_lora
from sdlora.lora_tools import main
from sdlora.lora_weights import LoraWeights, write_diffusers


def run_tool(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `python -m sdlora.lora_tools ARGV`, run in this process."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def deltas(weights: LoraWeights) -> dict[tuple[str, str], torch.Tensor]:
    return {(p, m): weights.delta(p, m) for p in weights.parts for m in weights.modules(p)}


def assert_same_deltas(a: LoraWeights, b: LoraWeights, atol: float = 1e-6) -> None:
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    for key in da:
        assert torch.allclose(da[key], db[key], atol=atol), key


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-tools")


@pytest.fixture(scope="module")
def sd1(root):
    """(model folder, pipeline, LoRA folder with both files) for SD 1.x: LoCon on all layers + text encoder."""
    path, pipe = tiny_pipeline("sd1", root)
    folder = root / "sd1-lora"
    write_both(make_weights(pipe, "all", "text_encoders", ss_output_name="mine"), folder)
    return path, pipe, folder


@pytest.fixture(scope="module")
def sdxl(root):
    path, pipe = tiny_pipeline("sdxl", root)
    folder = root / "sdxl-lora"
    write_both(make_weights(pipe, "all", "text_encoders"), folder)
    return path, pipe, folder


@pytest.fixture(scope="module")
def sd1_image(sd1) -> np.ndarray:
    """The image with the SD 1.x LoRA loaded from its diffusers file."""
    return loaded_image(sd1[1], sd1[2])


def test_info_tells_format_family_adapter_blocks_and_metadata(capsys, sd1, sdxl):
    code, out, _ = run_tool(capsys, "info", sd1[2] / "pytorch_lora_weights_kohya.safetensors")
    assert code == 0
    for expected in (
        "format:     kohya/A1111",
        "base model: SD 1.x",
        "adapter:    LoCon",
        "unet 79 (18 spatial convs), text_encoder 12",
        "down_blocks_0",
        "rank 4 alpha 8; rank 2 alpha 1",  # Linear/1x1 modules; the 3x3 convs after ';'
        "ss_output_name: mine",
        " KB)",
    ):
        assert expected in out, expected
    code, out, _ = run_tool(capsys, "info", sdxl[2] / "pytorch_lora_weights_kohya.safetensors")
    assert "base model: SDXL" in out and "input_blocks_4" in out and "text_encoder_2 12" in out
    code, out, _ = run_tool(capsys, "info", sdxl[2])  # the folder: our diffusers file, diffusers names
    assert "format:     diffusers (ours)" in out and "down_blocks.1" in out


def test_info_command_runs_as_a_module(sd1):
    result = run_script([sys.executable, "-m", "sdlora.lora_tools", "info", str(sd1[2])])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter:    LoCon" in result.stdout


def test_convert_round_trip_gives_the_same_tensors_and_loads_in_our_loader(capsys, sd1, tmp_path):
    from sdlora.generation import load_pipeline

    original = read_lora(sd1[2])
    assert (
        run_tool(capsys, "convert", sd1[2], "--to", "kohya", "--output", tmp_path / "k.safetensors")[0] == 0
    )
    assert (
        run_tool(capsys, "convert", tmp_path / "k.safetensors", "--to", "diffusers", "--output", tmp_path)[0]
        == 0
    )
    assert_same_weights(read_lora(tmp_path / "k.safetensors"), original)
    assert_same_weights(read_lora(tmp_path / "pytorch_lora_weights.safetensors"), original)
    _, lora = load_pipeline(str(sd1[0]), tmp_path / "k.safetensors")
    assert lora.layers == {"unet": 79, "text_encoder": 12}


def test_resize_to_full_rank_gives_the_original_image(capsys, sd1, sd1_image, tmp_path):
    code, out, _ = run_tool(capsys, "resize", sd1[2], "--rank", "4", "--output", tmp_path)
    assert code == 0
    assert "keeps 100.00% of its norm" in out
    assert_same_deltas(read_lora(tmp_path), read_lora(sd1[2]))
    assert np.abs(loaded_image(sd1[1], tmp_path) - sd1_image).max() < TOLERANCE


def decaying(weights: LoraWeights) -> LoraWeights:
    """The LoRA with up's columns scaled 1, 1/4, 1/16, ...: like a trained LoRA, whose deltas have a few
    large singular values (random ones have a flat spectrum that no lower rank approximates)."""
    for part, tensors in weights.parts.items():
        for module in weights.modules(part):
            up = tensors[module + ".lora_B.weight"]  # (out, r[, 1, 1])
            decay = 0.25 ** torch.arange(up.shape[1], dtype=torch.float32).reshape(
                1, -1, *[1] * (up.ndim - 2)
            )
            tensors[module + ".lora_B.weight"] = (up * decay).contiguous()
    return weights


def test_resize_to_a_lower_rank_keeps_the_image_close_and_reports_the_norm_kept(capsys, sd1, tmp_path):
    from sdlora.generation import load_pipeline

    pipe = sd1[1]
    write_both(decaying(make_weights(pipe, "all", "text_encoders", seed=3)), tmp_path / "original")
    kohya_file = tmp_path / "original" / "pytorch_lora_weights_kohya.safetensors"
    code, out, _ = run_tool(
        capsys, "resize", kohya_file, "--rank", "2", "--output", tmp_path / "r2.safetensors"
    )
    assert code == 0
    assert all(k.startswith("lora_") for k in load_file(tmp_path / "r2.safetensors"))  # kohya in, kohya out
    original, resized = read_lora(kohya_file), read_lora(tmp_path / "r2.safetensors")
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert resized.rank("unet", module) == 2 and resized.rank("unet", "down_blocks.0.resnets.0.conv1") == 2
    # the reported share is the norm of the new delta over the old one
    kept = torch.linalg.norm(resized.delta("unet", module)) / torch.linalg.norm(
        original.delta("unet", module)
    )
    assert f"unet.{module}: rank 4 -> 2, keeps {kept.item():.2%} of its norm" in out
    assert "mean kept" in out
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2.safetensors").rename(tmp_path / "r2" / "r2.safetensors")
    original_image = loaded_image(pipe, tmp_path / "original")
    resized_image = loaded_image(pipe, tmp_path / "r2", weight_name="r2.safetensors")
    # much closer to the LoRA's image than the base model is, but not equal
    base_distance = np.abs(image(pipe) - original_image).mean()
    assert 0 < np.abs(resized_image - original_image).mean() < 0.2 * base_distance
    _, lora = load_pipeline(str(sd1[0]), tmp_path / "r2" / "r2.safetensors")
    assert lora.layers["unet"] == 79


def smallest_rank(delta: np.ndarray, cap: int, method: str, param: float) -> int:
    """The rank each dynamic method must choose, from numpy's singular values of the full delta: the
    smallest that keeps `param` of the Frobenius norm (sv_fro) or of the values' sum (sv_cumulative), or
    the count of values above the largest / param (sv_ratio); within 1..cap."""
    s = np.linalg.svd(delta, compute_uv=False)
    if method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    else:
        kept = np.sqrt(np.cumsum(s**2) / (s**2).sum()) if method == "sv_fro" else np.cumsum(s) / s.sum()
        rank = next(k for k in range(1, len(s) + 1) if kept[k - 1] >= param)
    return max(1, min(rank, cap))


@pytest.fixture(scope="module")
def spread_lora(sd1, root) -> Path:
    """A LoRA whose modules' spectra decay at rates from 0.1 to 0.9 per rank (up's columns scaled so), so
    that each dynamic method keeps some modules whole and cuts others to one or two ranks."""
    weights = make_weights(sd1[1], "all", "text_encoders", seed=3)
    for i, (part, module) in enumerate((p, m) for p in weights.parts for m in weights.modules(p)):
        up = weights.parts[part][module + ".lora_B.weight"]  # (out, r[, 1, 1])
        decay = (0.1 + 0.2 * (i % 5)) ** torch.arange(up.shape[1], dtype=torch.float32)
        weights.parts[part][module + ".lora_B.weight"] = (
            up * decay.reshape(1, -1, *[1] * (up.ndim - 2))
        ).contiguous()
    return write_diffusers(weights, root / "spread" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("method,param", [("sv_fro", 0.99), ("sv_cumulative", 0.85), ("sv_ratio", 6.0)])
def test_dynamic_resize_chooses_the_smallest_rank_that_meets_the_target(
    capsys, spread_lora, tmp_path, method, param
):
    args = ("--dynamic_method", method, "--dynamic_param", str(param), "--output", tmp_path)
    assert run_tool(capsys, "resize", spread_lora, *args)[0] == 0
    original, resized = read_lora(spread_lora), read_lora(tmp_path)
    chosen, expected = {}, {}
    for part in original.parts:
        for module in original.modules(part):
            up = original.up(part, module).flatten(1).double().numpy()  # (out, r)
            down = original.down(part, module).flatten(1).double().numpy()  # (r, in * kh * kw)
            delta = original.alphas[part][module] / down.shape[0] * up @ down
            cap = original.rank(part, module)
            expected[part, module] = smallest_rank(delta, cap, method, param)
            chosen[part, module] = resized.rank(part, module)
    assert chosen == expected
    assert set(expected.values()) >= {1, 4}, sorted(expected.values())  # the targets do discriminate


def test_resize_of_a_dora_to_full_rank_gives_the_original_image(capsys, sd1, tmp_path):
    pipe = sd1[1]
    write_diffusers(
        make_weights(pipe, "attn_ff", "dora"), tmp_path / "dora" / "pytorch_lora_weights.safetensors"
    )
    assert (
        run_tool(capsys, "resize", tmp_path / "dora", "--rank", "4", "--output", tmp_path / "resized")[0] == 0
    )
    assert read_lora(tmp_path / "resized").is_dora()
    difference = loaded_image(pipe, tmp_path / "resized") - loaded_image(pipe, tmp_path / "dora")
    assert np.abs(difference).max() < TOLERANCE


def test_merge_with_itself_at_half_and_half_is_the_original(capsys, sd1, sd1_image, tmp_path):
    file = sd1[2] / "pytorch_lora_weights.safetensors"
    code, out, _ = run_tool(capsys, "merge", f"{file}:0.5", f"{file}:0.5", "--output", tmp_path)
    assert code == 0
    merged = read_lora(tmp_path)
    assert merged.rank("unet", "down_blocks.0.resnets.0.conv1") == 4  # 2 + 2, concatenated
    assert_same_deltas(merged, read_lora(file))
    assert np.abs(loaded_image(sd1[1], tmp_path) - sd1_image).max() < TOLERANCE
    from sdlora.generation import load_pipeline

    _, lora = load_pipeline(str(sd1[0]), tmp_path)
    assert lora.layers == {"unet": 79, "text_encoder": 12}


def test_sd2_lora_converted_either_way_gives_the_same_image_in_our_loader(capsys, root, tmp_path):
    from sdlora.generation import generate, load_pipeline

    path, pipe = tiny_pipeline("sd2", root)
    write_diffusers(
        make_weights(pipe, "attn_ff", "text_encoders"), tmp_path / "pytorch_lora_weights.safetensors"
    )
    kohya_file = tmp_path / "k.safetensors"
    assert run_tool(capsys, "convert", tmp_path, "--to", "kohya", "--output", kohya_file)[0] == 0
    assert run_tool(capsys, "convert", kohya_file, "--to", "diffusers", "--output", tmp_path / "back")[0] == 0
    images = []
    for lora_path in (tmp_path, kohya_file, tmp_path / "back"):
        ours, lora = load_pipeline(str(path), lora_path)
        assert lora.layers == {"unet": 48, "text_encoder": 12}
        images.append(np.asarray(generate(ours, "a red circle", num_inference_steps=2)[0], dtype=np.int16))
    assert np.array_equal(images[1], images[0]) and np.array_equal(images[2], images[0])


def test_merge_of_two_loras_is_their_weighted_sum_and_svd_to_a_rank_keeps_it_close(capsys, sd1, tmp_path):
    other = tmp_path / "other"
    write_both(make_weights(sd1[1], "attn", "unet", seed=5), other)
    a, b = sd1[2] / "pytorch_lora_weights_kohya.safetensors", other / "pytorch_lora_weights.safetensors"
    assert (
        run_tool(capsys, "merge", f"{a}:0.7", f"{b}:-0.5", "--output", tmp_path / "sum.safetensors")[0] == 0
    )
    assert (
        run_tool(
            capsys, "merge", f"{a}:0.7", f"{b}:-0.5", "--rank", "6", "--output", tmp_path / "r6.safetensors"
        )[0]
        == 0
    )
    weights_a, weights_b, merged = read_lora(a), read_lora(b), read_lora(tmp_path / "sum.safetensors")
    module = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    expected = 0.7 * weights_a.delta("unet", module) - 0.5 * weights_b.delta("unet", module)
    assert torch.allclose(merged.delta("unet", module), expected, atol=1e-6)
    assert merged.rank("unet", module) == 8
    svd = read_lora(tmp_path / "r6.safetensors")
    assert svd.rank("unet", module) == 6 and svd.alphas["unet"][module] == 6.0
    assert torch.allclose(
        svd.delta("unet", "down_blocks.0.resnets.0.conv1"),
        weights_a.delta("unet", "down_blocks.0.resnets.0.conv1") * 0.7,
        atol=1e-6,
    )


@pytest.fixture(scope="module")
def sd1_v(sd1, root):
    """The SD 1.x LoRA as if trained with --prediction_type v_prediction on the epsilon base (its header
    says "v", as the trainer writes it)."""
    weights = read_lora(sd1[2])
    weights.metadata["modelspec.prediction_type"] = "v"
    folder = root / "sd1-v-lora"
    write_diffusers(weights, folder / "pytorch_lora_weights.safetensors")
    return sd1[0], sd1[1], folder


@pytest.mark.parametrize("family", ["sd1-v", "sdxl"])
def test_fuse_gives_the_images_of_the_lora_loaded_by_load_pipeline(capsys, family, sd1_v, sdxl, tmp_path):
    """The fused model samples as load_pipeline samples base + LoRA: same weights at the scale, and the
    LoRA's prediction type (a v-prediction LoRA on an epsilon base is sampled as v-prediction)."""
    from sdlora.generation import load_pipeline

    model, pipe, folder = {"sd1-v": sd1_v, "sdxl": sdxl}[family]
    argv = ("fuse", "--base_model", model, "--lora", folder, "--scale", "0.7", "--output", tmp_path / "fused")
    code, _, err = run_tool(capsys, *argv)
    assert code == 0, err
    fused, _ = load_pipeline(str(tmp_path / "fused"))
    ours, _ = load_pipeline(str(model), folder)
    loaded = image(ours, cross_attention_kwargs={"scale": 0.7})
    assert np.abs(image(fused) - loaded).max() < 1e-4
    assert np.abs(image(pipe) - loaded).max() > 1e-2  # (the LoRA does change it)
    expected = "v_prediction" if family == "sd1-v" else "epsilon"
    assert fused.scheduler.config.prediction_type == ours.scheduler.config.prediction_type == expected


@pytest.fixture
def bad_inputs(tmp_path, sd1, sdxl) -> dict[str, tuple[list, str]]:
    """Each bad input: (command line, the file its error must name)."""
    text = tmp_path / "notes.safetensors"
    text.write_text("not a LoRA")
    weights = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(weights))
    sd1_file = sd1[2] / "pytorch_lora_weights_kohya.safetensors"
    sdxl_file = sdxl[2] / "pytorch_lora_weights_kohya.safetensors"
    out = ["--output", tmp_path / "out.safetensors"]
    return {
        "missing file": (["info", tmp_path / "nothing.safetensors"], "nothing.safetensors"),
        "text file": (["convert", text, "--to", "kohya", *out], "notes.safetensors"),
        "model weights": (["resize", weights, "--rank", "2", *out], "weights.safetensors"),
        "rank above": (["resize", sd1_file, "--rank", "5", *out], sd1_file.name),
        "families in merge": (["merge", sd1_file, sdxl_file, *out], "sdxl-lora"),
        "family in fuse": (
            ["fuse", "--base_model", sd1[0], "--lora", sdxl_file, "--output", tmp_path / "f"],
            "sdxl-lora",
        ),
        "existing output": (["convert", sd1_file, "--to", "diffusers", "--output", sd1_file], sd1_file.name),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "text file",
        "model weights",
        "rank above",
        "families in merge",
        "family in fuse",
        "existing output",
    ],
)
def test_bad_input_is_one_error_line_naming_the_file(capsys, bad_inputs, case, tmp_path):
    argv, name = bad_inputs[case]
    code, out, err = run_tool(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and name in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "f").exists()
