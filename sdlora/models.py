"""The base model: where it comes from, and loading its frozen parts through its family."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .families import Family, detect_family
from .tiny_model import TINY_MODEL_NAMES, TINY_SHAPES_DIR, ensure_tiny_model


def resolve_model(name_or_path: str | None) -> str:
    """The model to use: a built-in tiny model (built on first use) for none, "tiny", "tiny-sd2",
    "tiny-sdxl" or "tiny-sd3"; the committed pretrained one for "tiny-shapes"; otherwise the Hub id or folder as given, checked to be a diffusers folder if local."""
    if name_or_path in (None, ""):
        name_or_path = "tiny"
    if name_or_path == "tiny-shapes" and not Path(name_or_path).exists():
        return str(TINY_SHAPES_DIR)
    if name_or_path in TINY_MODEL_NAMES and not Path(name_or_path).exists():
        return str(ensure_tiny_model(family=TINY_MODEL_NAMES[name_or_path]))
    path = Path(name_or_path)
    if path.exists() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UserError(
            f"{path}: not a diffusers model folder (no model_index.json); pass a folder saved with "
            "save_pretrained or a Hub model id"
        )
    return name_or_path


def native_resolution(model: str, revision: str | None = None) -> int:
    """The resolution the base model was trained at (its family knows how to read it)."""
    return detect_family(model, revision).native_resolution(model, revision)


def load_tokenizer(model: str, revision: str | None = None, subfolder: str = "tokenizer"):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(model, subfolder=subfolder, revision=revision)
    except OSError as e:
        raise UserError(f"{model}: cannot load its tokenizer ({e}); check the model id or path") from None


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion model that LoRA training needs."""

    name: str
    family: Family
    tokenizers: list
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the UNet of SD 1.x/2.x/XL, SD 3.5's transformer
    noise_scheduler: object
    vae_dtype: torch.dtype | None = field(
        default=None
    )  # when the VAE must run in another dtype than the rest

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        return self.family.encode_prompts(self.tokenizers, self.text_encoders, prompts, device)

    def pipeline_components(self, denoiser: torch.nn.Module | None = None) -> dict:
        """The modules in memory under the family pipeline's component names."""
        parts = {self.family.denoiser: denoiser or self.denoiser, "vae": self.vae}
        parts.update(zip(self.family.text_encoders, self.text_encoders))
        parts.update(zip(self.family.tokenizers, self.tokenizers))
        return parts


def load_base_model(
    model: str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    t5_max_length: int | None = None,
) -> BaseModel:
    """Load tokenizers, text encoders, VAE (or `vae`, another folder or Hub id), denoiser and the family's
    training noise scheduler (DDPM; flow matching for SD 3.5), all frozen and in eval mode;
    t5_max_length: T5's tokens per caption (SD 3.5)."""
    import diffusers
    from diffusers import AutoencoderKL

    family = detect_family(model, revision)
    kw = {"revision": revision, "variant": variant}
    try:
        scheduler_class = getattr(diffusers, family.noise_scheduler_class)
        noise_scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler", revision=revision)
        tokenizers = family.load_tokenizers(model, revision, t5_max_length)
        text_encoders = family.load_text_encoders(model, **kw)
        autoencoder = (
            AutoencoderKL.from_pretrained(vae, revision=revision)
            if vae
            else AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
        )
        denoiser = family.load_denoiser(model, **kw)
    except OSError as e:
        raise UserError(
            f"{vae if vae and 'vae' in str(e) else model}: cannot load the model ({str(e).splitlines()[0]}); "
            "check the id, path or --variant"
        ) from None
    for module in (*text_encoders, autoencoder, denoiser):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(model, family, tokenizers, text_encoders, autoencoder, denoiser, noise_scheduler)


def place_frozen_model(
    base: BaseModel, device: torch.device, weight_dtype: torch.dtype, vae_is_fp16_safe: bool
) -> None:
    """Move the frozen parts to the device in the half type (if any). A VAE that overflows in fp16 (SDXL's
    own, unless another was passed) encodes in fp32 instead: a one-off cost with caching."""
    cast = (
        {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}
    )  # (diffusers warns on no-op casts)
    for module in (base.denoiser, *base.text_encoders):
        module.to(device, **cast)
    if weight_dtype == torch.float16 and not vae_is_fp16_safe:
        base.vae_dtype = torch.float32
        base.vae.to(device)
    else:
        base.vae.to(device, **cast)


def set_memory_options(
    base: BaseModel,
    gradient_checkpointing: bool,
    checkpoint_text_encoders: bool,
    xformers: bool,
    channels_last: bool,
) -> None:
    """Gradient checkpointing (the denoiser's, and trained text encoders'), xformers, channels_last."""
    if gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        if checkpoint_text_encoders:  # (non-reentrant: the frozen embeddings' outputs need no grad)
            for encoder in base.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if xformers:
        base.denoiser.enable_xformers_memory_efficient_attention()
    if channels_last:
        base.denoiser.to(memory_format=torch.channels_last)
