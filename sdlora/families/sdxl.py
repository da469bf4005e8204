"""SDXL: two text encoders, the second one's pooled output, and size/crop micro-conditioning (text_time)."""

from __future__ import annotations

import torch

from ..kohya import SDXL_LAYOUT, SDXL_NAMES, SgmLayout
from .base import Family, Geometry, token_ids

# Key prefixes only SDXL's kohya files have: two text encoders, and the SGM UNet's blocks.
_KOHYA_PREFIXES = (
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks",
    "lora_unet_middle_block",
    "lora_unet_output_blocks",
)


def time_ids(
    original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> tuple[int, int, int, int, int, int]:
    """SDXL's add_time_ids: (original height, width, crop top, left, target height, width) from
    (width, height) sizes and a (left, top) crop corner."""
    return (original[1], original[0], crop[1], crop[0], target[1], target[0])


class SDXLFamily(Family):
    """Two text encoders whose penultimate hidden states are concatenated, the second encoder's pooled
    output, and the image's original size, crop corner and target size as extra conditioning."""

    name = "sdxl"
    title = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    tokenizers = ("tokenizer", "tokenizer_2")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer")
    text_outputs = ("prompt_embeds", "pooled")
    vae_fp16_safe = False  # hence the fp16-fixed VAE users pass with --pretrained_vae_model_name_or_path
    kohya_names = SDXL_NAMES
    version_prefix, architecture_prefix, cross_attention_dim = "sdxl", "stable-diffusion-xl", 2048
    mid_blocks = 3  # kohya counts SDXL's middle_block.0-2 apart

    @property
    def pipeline_kwargs(self) -> dict:
        return {"add_watermarker": False}  # (invisible-watermark is not a dependency)

    def encode_prompts(
        self, tokenizers, text_encoders, prompts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, 77, D1 + D2), "pooled": (B, P)}, as StableDiffusionXLPipeline does."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]  # the last encoder's
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def denoiser_inputs(
        self, text: dict[str, torch.Tensor], geometry: list[Geometry] | None, device, dtype
    ) -> dict:
        ids = torch.tensor([time_ids(*g) for g in geometry], device=device, dtype=dtype)  # (B, 6)
        added = {"text_embeds": text["pooled"], "time_ids": ids}
        return {"encoder_hidden_states": text["prompt_embeds"], "added_cond_kwargs": added}

    def sgm_layout(self, denoiser_config) -> SgmLayout | None:
        return SgmLayout.from_unet_config(denoiser_config) if denoiser_config is not None else SDXL_LAYOUT

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def matches_model(self, index: dict, denoiser_config: dict) -> bool:
        return (
            "XL" in index.get("_class_name", "")
            or "text_encoder_2" in index
            or denoiser_config.get("addition_embed_type") == "text_time"
        )

    def matches_kohya_keys(self, keys) -> bool:
        return any(k.startswith(_KOHYA_PREFIXES) for k in keys)


SDXL = SDXLFamily()
