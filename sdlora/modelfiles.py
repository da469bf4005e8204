"""Reading a diffusers model's config files, from a local folder or the Hub (or its cache)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def read_model_config(model: str, filename: str, revision: str | None = None) -> dict:
    """A config file of a local diffusers folder or a Hub model (e.g. "unet/config.json")."""
    local = Path(model) / filename
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, filename, revision=revision)).read_text())
    except Exception as e:  # offline, unknown id, private repo: all end the same way for the user
        raise UserError(
            f"{model}: cannot read {filename} ({type(e).__name__}); check the model id or path"
        ) from None


def has_file(model: str, filename: str, revision: str | None = None) -> bool:
    """Whether a local folder or Hub model holds `filename` (a Hub lookup that fails counts as no)."""
    if Path(model).is_dir():
        return (Path(model) / filename).is_file()
    try:
        read_model_config(model, filename, revision)
    except UserError:
        return False
    return True
