"""inference.ipynb, `python -m sdlora.generate` and LoRA loading, on the tiny model with a LoRA trained here."""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import REPO, run_script, train_command
from PIL import Image
from safetensors.torch import load_file, save_file

from sdlora.errors import UserError
from sdlora.families import SD1
from sdlora.generation import generate, load_pipeline
from sdlora.lora import LORA_WEIGHT_NAME, add_lora, load_lora_into_models, save_lora_files

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle on a white background", "a blue square in a night sky"]
SLUGS = ["a-red-circle-on-a-white-background", "a-blue-square-in-a-night-sky"]
PARAMETERS = {
    "base_model",
    "lora_path",
    "lora_scale",
    "prompts",
    "negative_prompt",
    "num_images",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "output_dir",
}
# Few steps and images: the tiny model at 64x64 takes milliseconds a step.
FAST = {"num_images": 2, "num_inference_steps": 4, "guidance_scale": 7.5, "seed": 3}


def pixels(image: Image.Image | Path) -> np.ndarray:
    image = Image.open(image) if isinstance(image, Path) else image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def one_image(pipe, lora_scale=None) -> np.ndarray:
    image = generate(pipe, PROMPTS[0], num_inference_steps=4, seed=5, lora_scale=lora_scale)[0]
    return pixels(image)


# --- fixtures: a trained LoRA, a kernel, the notebook run ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    """A LoRA trained for 6 steps at a large learning rate (so it visibly changes images), checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("lora") / "out"
    command = train_command(
        tiny_model,
        tiny_dataset,
        out,
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--learning_rate",
        "1e-2",
    )
    result = run_script(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def inject_parameters(nb, params: dict) -> None:
    """What papermill does: a cell tagged injected-parameters right after the cell tagged parameters."""
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def run_notebook(kernel: str, params: dict):
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "inference.ipynb", as_version=4)
    inject_parameters(nb, params)
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def displayed_images(nb) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory, tiny_model, trained, kernel):
    """The notebook with the tiny model and the trained LoRA: (executed notebook, parameters)."""
    params = {
        "base_model": str(tiny_model),
        "lora_path": str(trained),
        "prompts": PROMPTS,
        "output_dir": str(tmp_path_factory.mktemp("notebook") / "results"),
        **FAST,
    }
    return run_notebook(kernel, params), params


# --- the notebook ------------------------------------------------------------------------------------


def test_notebook_is_committed_without_outputs_and_with_the_documented_parameters(repo):
    nb = nbformat.read(repo / "inference.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(tagged[0].source).body
        if isinstance(node, ast.Assign)
    }
    assert set(assigned) == PARAMETERS
    assert assigned["base_model"] is None and assigned["height"] is None and assigned["width"] is None
    assert assigned["num_inference_steps"] == 30 and assigned["guidance_scale"] == 7.5
    assert assigned["output_dir"] == "results"
    # The README's main command trains into the folder the notebook loads by default.
    assert assigned["lora_path"] == "output/tiny-lora"
    assert (
        'OUTPUT_DIR="${OUTPUT_DIR:-output/tiny-lora}"' in (repo / "train_text_to_image_lora.sh").read_text()
    )


def test_notebook_saves_native_size_pngs_and_shows_the_lora_side_by_side(notebook_run):
    nb, params = notebook_run
    results = Path(params["output_dir"])
    for slug in SLUGS:
        files = sorted((results / slug).glob("*.png"))
        assert [f.name for f in files] == ["image_0.png", "image_1.png"]
        assert all(Image.open(f).size == (64, 64) for f in files)
    records = [json.loads(line) for line in (results / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert records[0]["lora"].endswith(LORA_WEIGHT_NAME) and records[0]["seeds"] == [3, 4]

    grids = displayed_images(nb)
    # Section 3: one grid per prompt; section 4: without | with the LoRA; section 5: six scales.
    assert [g.size for g in grids] == [(128, 64), (128, 64), (128, 64), (6 * 64, 64)]
    pair = pixels(grids[2])
    without, with_lora = pair[:, :64], pair[:, 64:]
    assert np.abs(without - with_lora).mean() > 2, "the LoRA should change the image"
    # The saved image 0 of the first prompt is the "with" image: same prompt, seed and scale (generated
    # in a batch of two there, alone here: float sums differ in the last bits).
    assert np.abs(pixels(results / SLUGS[0] / "image_0.png") - with_lora).max() <= 2
    # Scale 0 in section 5 is the same image as "without" in section 4.
    assert np.array_equal(pixels(grids[3])[:, :64], without)


# kohya's TOML sample-prompt file: [prompt] defaults, a [[prompt.subset]] per prompt with its own settings.
KOHYA_PROMPTS = """
[prompt]
negative_prompt = "blurry"
sample_steps = 3

[[prompt.subset]]
prompt = "a green triangle"
width = 32
height = 48
seed = 9
"""


def test_notebook_takes_an_explicit_size_and_numbers_on_without_overwriting(
    notebook_run, kernel, tiny_model, tmp_path
):
    _, first = notebook_run
    results = Path(first["output_dir"])
    before = {p: p.read_bytes() for p in results.rglob("*.png")}
    prompt_file = tmp_path / "prompts.toml"
    prompt_file.write_text(KOHYA_PROMPTS)
    params = {
        **first, "lora_path": None, "prompts": [PROMPTS[0], str(prompt_file)], "num_images": 1, "height": 48,
        "width": 80,
    }  # fmt: skip
    nb = run_notebook(kernel, params)
    new, own = results / SLUGS[0] / "image_2.png", results / "a-green-triangle" / "image_0.png"
    assert Image.open(new).size == (80, 48)
    assert Image.open(own).size == (32, 48)  # the prompt's own size, over the notebook's
    record = json.loads((results / "generations.jsonl").read_text().splitlines()[-1])
    assert (record["seeds"], record["negative_prompt"], record["num_inference_steps"]) == ([9], "blurry", 3)
    assert {p: p.read_bytes() for p in before} == before
    assert set(results.rglob("*.png")) == set(before) | {new, own}
    assert "no LoRA loaded" in json.dumps(nb.cells[-1].outputs)
    # `python -m sdlora.generate` reads the same file into the same pixels.
    out = tmp_path / "command"
    command = [
        sys.executable,
        "-m",
        "sdlora.generate",
        "--prompts",
        str(prompt_file),
        "--output_dir",
        str(out),
    ]
    command += ["--base_model", str(tiny_model), "--num_images", "1"]
    assert run_script(command).returncode == 0
    assert np.array_equal(pixels(out / "a-green-triangle" / "image_0.png"), pixels(own))


# --- the command -------------------------------------------------------------------------------------


def test_command_gives_the_notebooks_pixels(notebook_run, tmp_path):
    _, params = notebook_run
    out = tmp_path / "results"
    command = [sys.executable, "-m", "sdlora.generate", "--prompts", *PROMPTS, "--output_dir", str(out)]
    for name in ("base_model", "lora_path", "num_images", "num_inference_steps", "guidance_scale", "seed"):
        command += [f"--{name}", str(params[name])]
    result = run_script(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "diffusers format: 32 layers in the unet" in result.stdout
    for slug in SLUGS:
        for name in ("image_0.png", "image_1.png"):
            mine, notebooks = out / slug / name, Path(params["output_dir"]) / slug / name
            assert np.array_equal(pixels(mine), pixels(notebooks)), mine


@pytest.mark.parametrize("case", ["missing path", "LoRA for another UNet"])
def test_command_reports_a_bad_lora_in_one_line(case, tmp_path, tiny_model, other_unet_lora):
    path = tmp_path / "nothing-here" if case == "missing path" else other_unet_lora
    command = [sys.executable, "-m", "sdlora.generate", "--base_model", str(tiny_model)]
    result = run_script(
        command + ["--lora_path", str(path), "--prompts", "x", "--output_dir", str(tmp_path / "r")]
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


# --- loading: scale, checkpoints, formats --------------------------------------------------------------


def test_scale_zero_is_the_base_model_and_scale_one_is_not(tiny_model, trained):
    base, _ = load_pipeline(str(tiny_model))
    with_lora, lora = load_pipeline(str(tiny_model), trained)
    assert lora.layers == {"unet": 32}
    assert np.array_equal(one_image(with_lora, 0.0), one_image(base))
    assert np.abs(one_image(with_lora, 1.0) - one_image(base)).mean() > 2
    # The scale is per call: after a scale-0 call, scale 1 gives the full LoRA again.
    assert np.array_equal(one_image(with_lora, 1.0), one_image(with_lora))


def test_final_and_checkpoint_folders_load_their_own_weights(tiny_model, trained):
    def image(path):
        pipe, lora = load_pipeline(str(tiny_model), path)
        return one_image(pipe), lora.path

    final, final_file = image(trained)
    last, last_file = image(trained / "checkpoint-6")
    middle, _ = image(trained / "checkpoint-3")
    assert (
        final_file == trained / LORA_WEIGHT_NAME and last_file == trained / "checkpoint-6" / LORA_WEIGHT_NAME
    )
    assert np.array_equal(final, last)  # the last checkpoint holds the final weights
    assert np.abs(final - middle).mean() > 0.5
    assert np.array_equal(image(trained / LORA_WEIGHT_NAME)[0], final)


def peft_state(trained: Path) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(load_file(str(trained / LORA_WEIGHT_NAME)))


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_kohya_file_gives_the_original_image(tmp_path, tiny_model, trained, alpha):
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(peft_state(trained))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    # alpha 8 at rank 4 doubles the LoRA's effect; halving lora_up keeps the same weights.
    kohya = {
        k: torch.tensor(alpha) if k.endswith(".alpha") else v * (4.0 / alpha) if "lora_up" in k else v
        for k, v in kohya.items()
    }
    save_file(kohya, str(tmp_path / "style.safetensors"))
    pipe, lora = load_pipeline(str(tiny_model), tmp_path / "style.safetensors")
    assert lora.format == "kohya" and lora.layers == {"unet": 32}
    original, _ = load_pipeline(str(tiny_model), trained)
    assert np.abs(one_image(pipe) - one_image(original)).max() <= 2


def test_old_attention_processor_bin_gives_the_original_image(tmp_path, tiny_model, trained):
    old = {}
    for key, tensor in load_file(str(trained / LORA_WEIGHT_NAME)).items():
        key = key.removeprefix("unet.").replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        key = key.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        for proj in ("to_q", "to_k", "to_v"):
            key = key.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
        old[key] = tensor
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in old
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "pytorch_lora_weights.bin")
    pipe, lora = load_pipeline(str(tiny_model), tmp_path / "old")
    assert lora.format == "attn-procs" and lora.layers == {"unet": 32}
    original, _ = load_pipeline(str(tiny_model), trained)
    assert np.abs(one_image(pipe) - one_image(original)).max() <= 2


def test_our_lora_alpha_from_the_file_header_is_applied(tmp_path, tiny_model, trained):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora(unet, rank=4, alpha=8)
    load_lora_into_models({"unet": unet}, trained / LORA_WEIGHT_NAME)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data *= 0.5  # alpha 8 at rank 4 doubles the effect: same weights overall
    save_lora_files({"unet": unet}, SD1, tmp_path / "alpha8", {})
    pipe, _ = load_pipeline(str(tiny_model), tmp_path / "alpha8")
    original, _ = load_pipeline(str(tiny_model), trained)
    assert np.abs(one_image(pipe) - one_image(original)).max() <= 2


# --- loading: what is refused ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_unet_lora(tmp_path_factory) -> Path:
    """A LoRA saved by our saver from a UNet twice as wide as the tiny model's."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    add_lora(unet, rank=4, alpha=4)
    return save_lora_files({"unet": unet}, SD1, tmp_path_factory.mktemp("other") / "wide", {})


class RunsCode:
    """Unpickling this would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_lora(kind: str, folder: Path, other_unet_lora: Path) -> tuple[Path, str]:
    """A path that is no LoRA for the tiny model, and the words the error must contain."""
    if kind == "folder without weights":
        (folder / "empty").mkdir()
        return folder / "empty", f"no {LORA_WEIGHT_NAME} in this folder"
    if kind == "random safetensors":
        save_file({"model.weight": torch.ones(3, 3)}, str(folder / "random.safetensors"))
        return folder / "random.safetensors", "not a LoRA file"
    if kind == "truncated safetensors":
        (folder / "cut.safetensors").write_bytes(other_unet_lora.read_bytes()[:100])
        return folder / "cut.safetensors", "not a readable safetensors file"
    if kind == "pickle that runs code":
        torch.save({"x": RunsCode(folder / "marker")}, folder / "evil.bin")
        return folder / "evil.bin", "weights_only=True"
    if kind == "LoRA for another UNet":
        return other_unet_lora, "not a LoRA for this base model"
    if kind == "SDXL-style kohya file":  # layers for SDXL's second text encoder
        layer = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
        tensors = {
            f"{layer}.lora_down.weight": torch.ones(4, 32),
            f"{layer}.lora_up.weight": torch.ones(64, 4),
        }
        save_file({**tensors, f"{layer}.alpha": torch.tensor(4.0)}, str(folder / "xl.safetensors"))
        return folder / "xl.safetensors", "SDXL"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "folder without weights",
        "random safetensors",
        "truncated safetensors",
        "pickle that runs code",
        "LoRA for another UNet",
        "SDXL-style kohya file",
    ],
)
def test_files_that_are_not_a_lora_for_this_model_are_refused_by_name(
    kind, tmp_path, tiny_model, other_unet_lora
):
    path, words = bad_lora(kind, tmp_path, other_unet_lora)
    with pytest.raises(UserError) as error:
        load_pipeline(str(tiny_model), path)
    message = str(error.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message, message
    assert not (tmp_path / "marker").exists()


def test_without_a_base_model_the_lora_s_own_is_loaded_where_it_can_be(tmp_path, tiny_model):
    """kohya's ss_sd_model_name names the model a LoRA was trained on: a folder that exists or a Hub id is
    loaded when no base model is given; a checkpoint file name (other trainers') or a folder that is gone
    falls back to the built-in tiny model."""
    from sdlora.generation import lora_base_model

    cases = {str(tiny_model): str(tiny_model), "owner/model": "owner/model", "v1-5-pruned.safetensors": None,
             "sd/v1-5-pruned.ckpt": None, str(tmp_path / "gone"): None, "": None}  # fmt: skip
    for name, expected in cases.items():
        save_file({"x": torch.zeros(1)}, tmp_path / "lora.safetensors", metadata={"ss_sd_model_name": name})
        assert lora_base_model(tmp_path / "lora.safetensors") == expected, name
