"""The README's commands are the ones that run: the install and test commands in CI, and every command of
its code blocks, run as written on the tiny models (here and in test_readme_recipes.py)."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from conftest import lora_header, run_script
from PIL import Image
from readme import REPO, marked_command, project_copy, readme_commands

# Each README command, verbatim, and the test that runs it.
RUN_BY = {
    "pip install torch==2.13.0 -r requirements.txt": "test_ci_runs_the_readme_install_and_test_commands",
    "HF_HUB_OFFLINE=1 python -m pytest": "test_ci_runs_the_readme_install_and_test_commands",
    marked_command("main-command"): "test_the_tiny_workflow_and_the_commands_that_follow_it",
    'python -m sdlora.generate --lora_path output/tiny-lora --prompts "a red circle" --height 48 --width 96 '
    '--negative_prompt "blurry" --lora_scale 0.8': "test_the_tiny_workflow_and_the_commands_that_follow_it",
    "python -m sdlora.lora_tools info output/tiny-lora/pytorch_lora_weights_kohya.safetensors": (
        "test_the_tiny_workflow_and_the_commands_that_follow_it"
    ),
    "OUTPUT_DIR=output/rank16 bash train_text_to_image_lora.sh --rank 16 --snr_gamma 5 --max_train_steps 50": (
        "test_the_tiny_workflow_and_the_commands_that_follow_it"
    ),
    "python train_text_to_image_lora.py --help": "test_every_script_answers_help",
    "FAMILY=sdxl bash train_text_to_image_lora.sh": "test_the_sdxl_demo_and_the_tiny_model_builder",
    "python -m sdlora.tiny_model --family sdxl --output_dir models/tiny-sdxl": (
        "test_the_sdxl_demo_and_the_tiny_model_builder"
    ),
    "python create_dataset.py": "test_create_dataset_examples",
    "python create_dataset.py --images_dir photos --captions_file photos/metadata.jsonl --dataset_name mine": (
        "test_create_dataset_examples"
    ),
}


def test_every_readme_command_is_run_by_a_test():
    from test_readme_recipes import RUN_BY as RECIPES
    from test_sd3_training import RUN_BY as SD35

    listed = {**RUN_BY, **RECIPES, **SD35}
    commands = readme_commands()
    assert len(commands) == len(set(commands))
    assert set(commands) == set(listed), (
        f"README commands no test runs: {sorted(set(commands) - set(listed))}; "
        f"listed but not in the README: {sorted(set(listed) - set(commands))}"
    )
    tests = {
        name
        for module in ("test_readme", "test_readme_recipes", "test_sd3_training")
        for name in dir(sys.modules[module])
    }
    assert set(listed.values()) <= tests


def test_the_checker_sees_commands_in_every_block_and_ignores_comments():
    text = "x\n```bash\n# a comment\nfoo --a \\\n  --b\n\nbar\n```\ny `baz`\n```python\nqux\n```\n"
    assert readme_commands(text) == ["foo --a --b", "bar"]


def test_ci_runs_the_readme_install_and_test_commands():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert marked_command("install-command") in lines and marked_command("test-command") in lines
    assert lines.index(marked_command("install-command")) < lines.index(marked_command("test-command"))


@pytest.mark.slow
def demo_scores(stdout: str) -> dict[str, tuple[float, float]]:
    """The (base, LoRA) pair of each row of the table sdlora.shapes_demo prints."""
    rows = re.findall(r"^(concept\w*|retention_\w+) +([\d.]+) +([\d.]+)", stdout, re.M)
    return {name: (float(base), float(lora)) for name, base, lora in rows}


def test_the_tiny_workflow_and_the_commands_that_follow_it(tmp_path):
    """The main command teaches the committed tiny-shapes the heart of images/ (its trigger prompts draw
    none before), keeps most of the shapes it knew, and writes every output the README lists."""
    root = project_copy(tmp_path)
    result = run_script(["bash", "-c", marked_command("main-command")], cwd=root, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "Traceback" not in result.stderr and "warning" not in result.stderr.split("***** training")[0].lower()
    )
    out = root / "output" / "tiny-lora"
    assert not (root / "models").exists()  # tiny-shapes is committed: nothing to build
    assert (root / "datasets" / "Text2Image_example" / "dataset_info.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
    ]
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        assert lora_header(out, name)["ss_steps"] == "300"
    assert json.loads((out / "args.json").read_text())["max_train_steps"] == 300
    assert "load_lora_weights" in (out / "README.md").read_text()
    assert len(list((out / "validation" / "step-300").glob("*.png"))) == 4
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    images = sorted((root / "results").rglob("image_*.png"))
    assert len(images) == 4 and all(Image.open(p).size == (64, 64) for p in images)
    assert re.search(r"time: total [\d.]+s; load", result.stderr)  # the split that says where the time goes
    # It learns: here the heart rate goes from 0.00 to 0.38 and the known shapes keep 0.81 (base 1.00), on 32
    # samples each; the bounds leave a few samples' room for another machine's (or thread count's)
    # arithmetic, none for a LoRA that learns nothing (LoKr, which barely learns the heart, scores 0.06).
    scores = demo_scores(result.stdout)
    assert scores["concept"][0] <= 0.1 and scores["concept"][1] >= 0.25, result.stdout
    assert scores["retention_shape"][0] >= 0.9 and scores["retention_shape"][1] >= 0.6, result.stdout
    assert Image.open(out / "before_after.png").size == (1024, 256)

    generate = run_script(["bash", "-c", _command("python -m sdlora.generate --lora_path")], cwd=root)
    assert generate.returncode == 0, generate.stderr[-3000:]
    (png,) = (root / "results" / "a-red-circle").glob("image_0.png")
    assert Image.open(png).size == (96, 48)
    record = json.loads((root / "results" / "generations.jsonl").read_text().splitlines()[-1])
    assert record["negative_prompt"] == "blurry" and record["lora_scale"] == 0.8

    info = run_script(["bash", "-c", _command("python -m sdlora.lora_tools info")], cwd=root)
    assert info.returncode == 0 and "kohya" in info.stdout and "SD 1.x" in info.stdout, (
        info.stdout + info.stderr
    )

    rank16 = run_script(["bash", "-c", _command("OUTPUT_DIR=output/rank16")], cwd=root, timeout=900)
    assert rank16.returncode == 0, rank16.stderr[-3000:]
    meta = lora_header(root / "output" / "rank16")
    assert meta["ss_network_dim"] == "16" and meta["ss_min_snr_gamma"] == "5.0"


def _command(prefix: str) -> str:
    (command,) = [c for c in RUN_BY if c.startswith(prefix)]
    return command


@pytest.mark.slow
def test_every_script_answers_help(capsys):
    import importlib

    # The README's command, as written:
    result = run_script([sys.executable, "train_text_to_image_lora.py", "--help"])
    assert (
        result.returncode == 0 and "--validation_split" in result.stdout and "Traceback" not in result.stderr
    )
    # The other entry points' parsers, in this process (what `--help` prints comes from the same parse_args).
    parsers = {
        "create_dataset": "parse_args",
        "generate_captions": "parse_args",
        "sdlora.generate": "parse_args",
        "sdlora.lora_tools.cli": "parse_args",
        "sdlora.tiny_model": "main",
        "sdlora.sample_data": "main",
        "sdlora.shapes_demo": "parse_args",
        "sdlora.families.__main__": "main",
    }
    for module, function in parsers.items():
        with pytest.raises(SystemExit) as exit_, pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", [module, "--help"])
            entry = getattr(importlib.import_module(module), function)
            entry(["--help"]) if function == "parse_args" else entry()
        assert exit_.value.code == 0 and "usage" in capsys.readouterr().out.lower(), module


@pytest.mark.slow
def test_the_sdxl_demo_and_the_tiny_model_builder(tmp_path):
    root = project_copy(tmp_path)
    build = run_script(["bash", "-c", _command("python -m sdlora.tiny_model")], cwd=root)
    assert build.returncode == 0, build.stderr[-2000:]
    index = json.loads((root / "models" / "tiny-sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    demo = run_script(["bash", "-c", "FAMILY=sdxl bash train_text_to_image_lora.sh"], cwd=root, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = root / "output" / "tiny-sdxl-lora"
    assert lora_header(out)["ss_base_model_version"] == "sdxl_base_v1-0"
    assert len(list((out / "validation" / "step-200").glob("*.png"))) == 4
    assert all(Image.open(p).size == (128, 128) for p in (out / "validation" / "step-200").glob("*.png"))


@pytest.mark.slow
def test_create_dataset_examples(tmp_path, tiny_model):
    import datasets

    from sdlora.captions import read_captions_json, write_metadata_jsonl

    root = project_copy(tmp_path)
    shutil.copytree(tiny_model, root / "models" / "tiny-sd")  # what the scripts build on first use
    default = run_script(["bash", "-c", "python create_dataset.py"], cwd=root)
    assert default.returncode == 0, default.stderr[-2000:]
    assert len(datasets.load_from_disk(str(root / "datasets" / "Text2Image_example"))) == 48
    shutil.copytree(root / "images", root / "photos")
    captions = read_captions_json(root / "image_captions.json")
    write_metadata_jsonl(
        root / "photos" / "metadata.jsonl", {root / "photos" / p.name: c for p, c in captions.items()}
    )
    mine = run_script(["bash", "-c", _command("python create_dataset.py --images_dir photos")], cwd=root)
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert sorted(datasets.load_from_disk(str(root / "datasets" / "mine"))["text"]) == sorted(
        captions.values()
    )
