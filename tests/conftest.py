"""Shared fixtures: offline mode, and the tiny models built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny Stable Diffusion model, saved in the diffusers layout."""
    from sdlora.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def sample_data(tmp_path) -> Path:
    """A fresh copy of the sample images, captions and prompts in a temporary folder."""
    from sdlora.sample_data import write_sample_data

    write_sample_data(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The sample images and captions as a dataset saved by the dataset builder."""
    from sdlora.captions import read_captions_json
    from sdlora.dataset_builder import build_dataset, pair_examples
    from sdlora.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("data")
    write_sample_data(root)
    examples, problems = pair_examples(
        root / "images", read_captions_json(root / "image_captions.json"), "captions"
    )
    build_dataset(examples, root / "dataset", known_problems=problems)
    return root / "dataset"


def run_script(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run a command in a subprocess, offline; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        args, cwd=cwd or REPO, capture_output=True, text=True, env=full_env, timeout=timeout
    )


def train_command(
    tiny_model: Path, dataset: Path, output_dir: Path, *extra: str, launch: tuple[str, ...] = ()
) -> list[str]:
    """`accelerate launch --quiet --cpu train_text_to_image_lora.py` on the tiny model, small and fast.

    (--quiet: accelerate's launcher then exits 1 on a failed run instead of adding its own traceback.)"""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--quiet",
        "--cpu",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        *(launch or ("--num_processes", "1", "--mixed_precision", "no")),
        str(REPO / "train_text_to_image_lora.py"),
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--dataset_from_disk",
        "--dataset_disk_path",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "1",
        *extra,
    ]
