"""The Stable Diffusion families (SD 1.x, SD 2.x, SDXL, SD 3.5), one object each, and the one detector that tells
a model folder's or a LoRA file's family by asking each family in turn (most specific first).

A new family is a module here with a Family subclass, and an entry in FAMILIES."""

from __future__ import annotations

import re

import torch

from ..modelfiles import read_model_config
from .base import SD1, Family, Geometry
from .sd2 import SD2
from .sd3 import SD3
from .sdxl import SDXL, time_ids

# detection order: most specific first (SD 3.5 before SDXL: kohya names both text encoders lora_te1/te2)
FAMILIES: dict[str, Family] = {f.name: f for f in (SD3, SDXL, SD2, SD1)}

__all__ = [
    "FAMILIES",
    "SD1",
    "SD2",
    "SD3",
    "SDXL",
    "Family",
    "Geometry",
    "detect_family",
    "family_of_denoiser",
    "family_of_lora",
    "family_of_pipeline",
    "time_ids",
]


def detect_family(model: str, revision: str | None = None) -> Family:
    """The family of a diffusers model folder or Hub id, from model_index.json and its denoiser's config."""
    index = read_model_config(model, "model_index.json", revision)
    configs: dict[str, dict] = {}
    for family in FAMILIES.values():
        name = family.denoiser
        if name not in configs:
            configs[name] = read_model_config(model, f"{name}/config.json", revision) if name in index else {}
        if name in index and family.matches_model(index, configs[name]):
            return family
    return SD1


def family_of_denoiser(config: dict) -> Family:
    """The family of a UNet (or other denoiser) from its config alone."""
    return next(f for f in FAMILIES.values() if f.matches_model({}, config))


def family_of_pipeline(pipe) -> Family:
    """The family of a diffusers pipeline in memory, from its class and its denoiser's config."""
    index = {"_class_name": type(pipe).__name__}
    for family in FAMILIES.values():
        denoiser = getattr(pipe, family.denoiser, None)
        if denoiser is not None and family.matches_model(index, dict(denoiser.config)):
            return family
    return SD1


def family_of_lora(
    header: dict[str, str], kohya_keys: list[str], parts: dict[str, dict[str, torch.Tensor]]
) -> Family | None:
    """A LoRA file's family: from key names only one family's kohya files have, else the header's names
    (kohya's ss_base_model_version, the model spec's architecture), else the cross-attention width of its
    layers; None when nothing tells."""
    for family in FAMILIES.values():
        if family.matches_kohya_keys(kohya_keys):
            return family
    owners = [f for f in FAMILIES.values() if f.denoiser in parts]
    if len(owners) == 1:  # a denoiser part only one family has (SD 3.5's transformer)
        return owners[0]
    if "text_encoder_2" in parts:
        return SDXL
    for family in FAMILIES.values():
        if family.matches_header(header):
            return family
    widths = {f.cross_attention_dim: f for f in FAMILIES.values()}
    for part in parts.values():
        for key, tensor in part.items():
            if re.search(r"attn2\.to_[kv]\.lora_A\.weight$", key):
                return widths.get(tensor.shape[1])
    return None
