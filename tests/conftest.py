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
