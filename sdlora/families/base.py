"""A Stable Diffusion family: everything that differs between SD 1.x, SD 2.x and SDXL, asked of one object.

The trainer, the caches, validation, inference, the LoRA writers and the tools ask the family: how to load
its parts and which is the denoiser (a UNet here; SD 3.5's transformer next), how prompts become the
denoiser's conditioning and which text tensors to cache, whether its VAE is safe in fp16, its native size
and size multiple, which layers each LoRA layer set adapts, how kohya/A1111 name its LoRA modules, the
names other tools use for it (kohya's `ss_base_model_version`, the SAI model spec), its pipeline class,
and how to recognise it from a model folder or a LoRA file (sdlora.families.detect_* ask each family in turn).

`Family` is SD 1.x; the other families override what differs (sdlora/families/sd2.py, sdxl.py).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from ..kohya import SD_NAMES, KohyaFormatError, KohyaNames, SgmLayout, sgm_path
from ..modelfiles import read_model_config

# The UNet's attention projections: what the diffusers example trains.
ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# kohya's LoRA: every Linear and 1x1 conv inside the transformer blocks (Transformer2DModel).
IN_TRANSFORMER = re.compile(r"\.attentions\.\d+\.")
# kohya's LoCon adds the ResNet blocks and the down/up-samplers.
IN_RESNET = re.compile(r"\.resnets\.\d+\.|\.(down|up)samplers\.\d+\.conv$")
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP = ["fc1", "fc2"]


class Geometry(NamedTuple):
    """An example's picture geometry, for families conditioned on it (SDXL): sizes as (width, height)."""

    original: tuple[int, int]  # the upright image's size
    crop: tuple[int, int]  # (left, top) of the crop in the resized (and possibly flipped) picture
    target: tuple[int, int]  # the bucket the denoiser sees


def is_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | torch.nn.Conv2d)


def is_spatial_conv(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def unet_layer_set(unet: torch.nn.Module, layers: str) -> list[str]:
    """Full names of a UNet's layers in a layer set: attn, attn_ff or all (see sdlora.config.train)."""
    names = []
    for name, module in unet.named_modules():
        if not is_layer(module):
            continue
        if layers == "attn":
            chosen = bool(ATTENTION.search(name))
        else:
            chosen = bool(IN_TRANSFORMER.search(name)) and not is_spatial_conv(module)
            chosen |= layers == "all" and bool(IN_RESNET.search(name))
        if chosen:
            names.append(name)
    return names


def token_ids(tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Token ids padded to the tokenizer's maximum length; longer captions are truncated."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)


class Family:
    """SD 1.x: one CLIP text encoder whose last hidden states condition a UNet; epsilon, 512 px."""

    name = "sd1"
    title = "SD 1.x"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoders: tuple[str, ...] = ("text_encoder",)  # pipeline component names
    text_encoder_classes: tuple[str, ...] = ("CLIPTextModel",)  # transformers classes, in the same order
    tokenizers: tuple[str, ...] = ("tokenizer",)
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)  # transformers classes of the tokenizers
    denoiser = "unet"  # the pipeline component LoRA trains (and the LoRA files' part name)
    noise_scheduler_class = "DDPMScheduler"  # the training noise schedule read from the model's scheduler/
    text_outputs: tuple[str, ...] = (
        "prompt_embeds",
    )  # what encode_prompts returns: the text cache's tensors
    vae_fp16_safe = True  # SDXL's own VAE overflows in fp16
    kohya_names: KohyaNames = SD_NAMES
    # How LoRA files name the family (kohya's ss_base_model_version, the model spec), and the cross-attention
    # width of its real models (the UNet's attn2.to_k input), which tells a file's family from its shapes.
    version_prefix, architecture_prefix, cross_attention_dim = "sd_v1", "stable-diffusion-v1", 768

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- loading --------------------------------------------------------------------------------------

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def pipeline_kwargs(self) -> dict:
        """Extra arguments the pipeline class takes when built without its optional parts."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load_denoiser(self, model: str, **kwargs) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(model, subfolder=self.denoiser, **kwargs)

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        """The text encoders --train_text_encoder adapts (SD 3.5 leaves T5 frozen)."""
        return self.text_encoders

    def load_tokenizers(self, model: str, revision: str | None = None, t5_max_length: int | None = None):
        """The tokenizers, in `tokenizers` order (t5_max_length: T5's tokens per caption, where there is one)."""
        import transformers

        return [
            getattr(transformers, cls).from_pretrained(model, subfolder=sub, revision=revision)
            for sub, cls in zip(self.tokenizers, self.tokenizer_classes)
        ]

    def prediction_type(self, scheduler, requested: str | None = None) -> str:
        """What the denoiser predicts: --prediction_type if given, else what the model's scheduler says."""
        return requested or scheduler.config.prediction_type

    def load_text_encoders(self, model: str, **kwargs) -> list[torch.nn.Module]:
        import transformers

        return [
            getattr(transformers, cls).from_pretrained(model, subfolder=sub, **kwargs)
            for sub, cls in zip(self.text_encoders, self.text_encoder_classes)
        ]

    def native_resolution(self, model: str, revision: str | None = None) -> int:
        """The resolution the base model was trained at: the UNet's sample size times the VAE's factor."""
        unet = read_model_config(model, f"{self.denoiser}/config.json", revision)
        return int(unet["sample_size"]) * self.vae_factor(model, revision)

    def size_multiple(self, model: str, revision: str | None = None) -> int:
        """The pixel multiple at which the UNet's downsampling comes out even: VAE factor x 2^(levels-1)."""
        unet = read_model_config(model, f"{self.denoiser}/config.json", revision)
        return self.vae_factor(model, revision) * 2 ** (len(unet["down_block_types"]) - 1)

    @staticmethod
    def vae_factor(model: str, revision: str | None = None) -> int:
        vae = read_model_config(model, "vae/config.json", revision)
        return 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    # --- conditioning ---------------------------------------------------------------------------------

    def encode_prompts(
        self, tokenizers, text_encoders, prompts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, 77, D)}; captions past the tokenizer's 77 tokens are truncated."""
        ids = token_ids(tokenizers[0], prompts, device)
        return {"prompt_embeds": text_encoders[0](ids, return_dict=False)[0]}

    def denoiser_inputs(
        self, text: dict[str, torch.Tensor], geometry: list[Geometry] | None, device, dtype
    ) -> dict:
        """Keyword arguments of the denoiser's forward for this text conditioning (and picture geometry)."""
        return {"encoder_hidden_states": text["prompt_embeds"]}

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The denoiser's prediction for noisy latents at `timesteps`."""
        return model(noisy, timesteps, **inputs, return_dict=False)[0]

    def lora_scale_kwargs(self, scale: float) -> dict:
        """The pipeline call's arguments that scale a loaded LoRA by `scale`."""
        return {"cross_attention_kwargs": {"scale": scale}}

    # --- LoRA -----------------------------------------------------------------------------------------

    def lora_targets(self, denoiser: torch.nn.Module, layers: str) -> list[str]:
        """The denoiser layers a layer set adapts (attn, attn_ff, all)."""
        return unet_layer_set(denoiser, layers)

    def text_lora_targets(self, layers: str) -> list[str]:
        """The text encoder layers (name suffixes) a layer set adapts."""
        return TEXT_ATTENTION + (TEXT_MLP if layers != "attn" else [])

    def sgm_layout(self, denoiser_config) -> SgmLayout | None:
        """The UNet block layout kohya's names follow (SDXL's SGM numbering), or None (diffusers paths)."""
        return None

    # kohya's block weights (--down_lr_weight, --mid_lr_weight, --up_lr_weight, --block_dims) count the UNet's
    # blocks as SGM's input_blocks, middle_block and output_blocks number them: IN00-IN11, M00, OUT00-OUT11
    # for SD 1.x/2.x (the middle as one), IN00-IN08, M00-M02, OUT00-OUT08 for SDXL.
    mid_blocks = 1

    def lora_block(self, module: str, denoiser_config) -> tuple[str, int] | None:
        """("down" | "mid" | "up", index) of a denoiser module among kohya's blocks; None outside them."""
        try:
            path = sgm_path(module, SgmLayout.from_unet_config(denoiser_config))
        except KohyaFormatError:
            return None
        if m := re.match(r"(input|output)_blocks\.(\d+)\.", path):
            return ("down" if m[1] == "input" else "up"), int(m[2])
        if m := re.match(r"middle_block\.(\d+)\.", path):
            return "mid", int(m[1]) if self.mid_blocks > 1 else 0
        return None

    def block_counts(self, denoiser_config) -> tuple[int, int, int]:
        """How many (down, mid, up) blocks kohya's block weights give values for, for this denoiser."""
        levels, layers = len(denoiser_config["down_block_types"]), SgmLayout.from_unet_config(denoiser_config)
        span = layers.layers_per_block + 1  # a level's ResNets (with their attention) and its sampler
        return (
            levels * span,
            self.mid_blocks,
            levels * span,
        )  # (input block 0 is conv_in; the last level has no downsampler)

    # --- names other tools use ------------------------------------------------------------------------

    def base_model_version(self, prediction_type: str) -> str:
        """kohya's `ss_base_model_version`, which A1111 uses to list a LoRA under the right models."""
        return "sd_v1"

    def modelspec_architecture(self, prediction_type: str) -> str:
        """The SAI model spec's `modelspec.architecture` of a LoRA for this family."""
        return "stable-diffusion-v1/lora"

    def kohya_metadata(self, prediction_type: str, denoiser_config: dict | None = None) -> dict[str, str]:
        """The header keys that name the base model, as kohya's trainers write them (SD 3.5's name the
        variant its transformer's config says)."""
        return {
            "ss_base_model_version": self.base_model_version(prediction_type),
            "ss_v2": "False",
            "modelspec.architecture": self.modelspec_architecture(prediction_type),
        }

    # --- recognising it -------------------------------------------------------------------------------

    def matches_model(self, index: dict, denoiser_config: dict) -> bool:
        """Whether a diffusers folder (its model_index.json and denoiser config) is of this family."""
        return True  # SD 1.x: what no other family claims

    def matches_header(self, header: dict[str, str]) -> bool:
        """Whether a LoRA header's kohya or model-spec names say this family."""
        return header.get("ss_base_model_version", "").startswith(self.version_prefix) or header.get(
            "modelspec.architecture", ""
        ).startswith(self.architecture_prefix)

    def matches_kohya_keys(self, keys) -> bool:
        """Whether a kohya file's key names are ones only this family's files have."""
        return False


SD1 = Family()
