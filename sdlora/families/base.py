"""What differs between the Stable Diffusion families (SD 1.x, SD 2.x, SDXL), one object per family.

The trainer, validation, inference and the LoRA writers ask the family for what differs: the pipeline
class, the text encoders and how prompts become UNet conditioning, SDXL's size/crop conditioning, and
the names other tools use for the base model (kohya's `ss_base_model_version`, the SAI model spec).
The one other place that knows a family is sdlora/kohya.py, whose key names follow SDXL's SGM block
layout (and te1/te2) for SDXL files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@dataclass(frozen=True)
class Family:
    """SD 1.x and 2.x: one CLIP text encoder whose last hidden states condition the UNet."""

    name: str  # "sd1", "sd2", "sdxl"
    title: str  # for messages: "SD 1.x"
    pipeline_class_name: str
    text_encoders: tuple[str, ...] = ("text_encoder",)  # pipeline component names
    tokenizers: tuple[str, ...] = ("tokenizer",)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def pipeline_kwargs(self) -> dict:
        """Extra arguments the pipeline class takes when built without its optional parts."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @property
    def uses_time_ids(self) -> bool:
        """Whether the UNet is conditioned on image size and crop (SDXL's micro-conditioning)."""
        return False

    def base_model_version(self, prediction_type: str) -> str:
        """kohya's `ss_base_model_version`, which A1111 uses to list a LoRA under the right models."""
        if self.name == "sd2":
            return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"
        return "sd_v1"

    def modelspec_architecture(self, prediction_type: str) -> str:
        """The SAI model spec's `modelspec.architecture` of a LoRA for this family."""
        if self.name == "sd2":
            return (
                "stable-diffusion-v2-768-v/lora"
                if prediction_type == "v_prediction"
                else "stable-diffusion-v2-512/lora"
            )
        return "stable-diffusion-v1/lora"

    def encode_prompts(
        self, tokenizers, text_encoders, prompts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, 77, D)}; captions past the tokenizer's 77 tokens are truncated."""
        ids = _token_ids(tokenizers[0], prompts, device)
        return {"prompt_embeds": text_encoders[0](ids, return_dict=False)[0]}

    def unet_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor | None) -> dict:
        """Keyword arguments of the UNet's forward for this conditioning."""
        return {"encoder_hidden_states": text["prompt_embeds"]}


@dataclass(frozen=True)
class XLFamily(Family):
    """SDXL: two text encoders whose penultimate hidden states are concatenated, the second encoder's
    pooled output, and the image's original size, crop corner and target size as extra conditioning."""

    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    tokenizers: tuple[str, ...] = ("tokenizer", "tokenizer_2")

    @property
    def pipeline_kwargs(self) -> dict:
        return {"add_watermarker": False}  # (invisible-watermark is not a dependency)

    @property
    def uses_time_ids(self) -> bool:
        return True

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base/lora"

    def encode_prompts(
        self, tokenizers, text_encoders, prompts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, 77, D1 + D2), "pooled": (B, P)}, as StableDiffusionXLPipeline does."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders):
            out = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]  # the last encoder's
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def unet_inputs(self, text: dict[str, torch.Tensor], time_ids: torch.Tensor | None) -> dict:
        added = {"text_embeds": text["pooled"], "time_ids": time_ids}
        return {"encoder_hidden_states": text["prompt_embeds"], "added_cond_kwargs": added}


SD1 = Family("sd1", "SD 1.x", "StableDiffusionPipeline")
SD2 = Family("sd2", "SD 2.x", "StableDiffusionPipeline")
SDXL = XLFamily("sdxl", "SDXL", "StableDiffusionXLPipeline")
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def time_ids(
    original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> tuple[int, int, int, int, int, int]:
    """SDXL's add_time_ids: (original height, width, crop top, left, target height, width) from
    (width, height) sizes and a (left, top) crop corner."""
    return (original[1], original[0], crop[1], crop[0], target[1], target[0])


def _token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)


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


def family_of_unet_config(config) -> Family:
    """The family a UNet belongs to: SDXL (text_time added conditioning), SD 2.x (linear transformer
    projections or 1024-wide cross-attention, as OpenCLIP's text encoder gives), else SD 1.x."""
    if config.get("addition_embed_type") == "text_time":  # (a UNet's config is a dict)
        return SDXL
    if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024:
        return SD2
    return SD1


def detect_family(model: str, revision: str | None = None) -> Family:
    """The family of a diffusers model folder or Hub id: SDXL from its pipeline class, else from its UNet."""
    index = read_model_config(model, "model_index.json", revision)
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return SDXL
    return family_of_unet_config(read_model_config(model, "unet/config.json", revision))


def main() -> None:
    """`python -m sdlora.families MODEL` prints the model's family (sd1, sd2 or sdxl): for the launcher."""
    import argparse

    from .errors import run_cli
    from .models import resolve_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="Hub id or local diffusers folder")
    args = parser.parse_args()
    run_cli(lambda: print(detect_family(resolve_model(args.model)).name))


if __name__ == "__main__":
    main()
