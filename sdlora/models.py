"""The base model: where it comes from, its family and native size, and loading its frozen parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .families import Family, detect_family, read_model_config
from .tiny_model import TINY_MODEL_NAMES, ensure_tiny_model


def resolve_model(name_or_path: str | None) -> str:
    """The model to use: a built-in tiny model (built on first use) for none, "tiny", "tiny-sd2" or
    "tiny-sdxl"; otherwise the Hub id or folder as given, checked to be a diffusers folder if local."""
    if name_or_path in (None, ""):
        name_or_path = "tiny"
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
    """The resolution the base model was trained at: UNet sample size times the VAE's scale factor."""
    unet = read_model_config(model, "unet/config.json", revision)
    vae = read_model_config(model, "vae/config.json", revision)
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return int(unet["sample_size"]) * scale


def size_multiple(model: str, revision: str | None = None) -> int:
    """The pixel multiple at which the UNet's downsampling comes out even: VAE factor x 2^(levels-1)."""
    unet = read_model_config(model, "unet/config.json", revision)
    vae = read_model_config(model, "vae/config.json", revision)
    return 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1) * 2 ** (
        len(unet["down_block_types"]) - 1
    )


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
    unet: torch.nn.Module
    noise_scheduler: object
    vae_dtype: torch.dtype | None = field(
        default=None
    )  # when the VAE must run in another dtype than the rest

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    def encode_prompts(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        return self.family.encode_prompts(self.tokenizers, self.text_encoders, prompts, device)

    def pipeline_components(self, unet: torch.nn.Module | None = None) -> dict:
        """The modules in memory under the family pipeline's component names."""
        parts = {"unet": unet or self.unet, "vae": self.vae}
        parts.update(zip(self.family.text_encoders, self.text_encoders))
        parts.update(zip(self.family.tokenizers, self.tokenizers))
        return parts


def load_base_model(
    model: str, revision: str | None = None, variant: str | None = None, vae: str | None = None
) -> BaseModel:
    """Load tokenizers, text encoders, VAE (or `vae`, another folder or Hub id), UNet and a DDPM noise
    scheduler, all frozen and in eval mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = detect_family(model, revision)
    kw = {"revision": revision, "variant": variant}
    encoder_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
        tokenizers = [load_tokenizer(model, revision, sub) for sub in family.tokenizers]
        text_encoders = [
            encoder_classes[sub].from_pretrained(model, subfolder=sub, **kw) for sub in family.text_encoders
        ]
        autoencoder = (
            AutoencoderKL.from_pretrained(vae, revision=revision)
            if vae
            else AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
        )
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw)
    except OSError as e:
        raise UserError(
            f"{vae if vae and 'vae' in str(e) else model}: cannot load the model ({str(e).splitlines()[0]}); "
            "check the id, path or --variant"
        ) from None
    for module in (*text_encoders, autoencoder, unet):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(model, family, tokenizers, text_encoders, autoencoder, unet, noise_scheduler)


def load_frozen_model(args, device: torch.device, weight_dtype: torch.dtype) -> BaseModel:
    """The frozen base model in the half type (if any) on the device; resolves
    args.pretrained_model_name_or_path (tiny model by default), args.resolution (native size) and
    args.prediction_type (the scheduler's unless given)."""
    args.pretrained_model_name_or_path = resolve_model(args.pretrained_model_name_or_path)
    base = load_base_model(
        args.pretrained_model_name_or_path,
        args.revision,
        args.variant,
        args.pretrained_vae_model_name_or_path,
    )
    args.resolution = args.resolution or native_resolution(args.pretrained_model_name_or_path, args.revision)
    if args.prediction_type:
        base.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    args.prediction_type = base.noise_scheduler.config.prediction_type
    cast = (
        {"dtype": weight_dtype} if weight_dtype != torch.float32 else {}
    )  # (diffusers warns on no-op casts)
    for module in (base.unet, *base.text_encoders):
        module.to(device, **cast)
    # SDXL's own VAE overflows in fp16 (hence the fp16-fixed VAE users pass with
    # --pretrained_vae_model_name_or_path); without one it encodes in fp32, a one-off cost with caching.
    if (
        base.family.uses_time_ids
        and weight_dtype == torch.float16
        and not args.pretrained_vae_model_name_or_path
    ):
        base.vae_dtype = torch.float32
        base.vae.to(device)
    else:
        base.vae.to(device, **cast)
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:  # (non-reentrant: the frozen embeddings' outputs need no grad)
            for encoder in base.text_encoders:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.enable_xformers_memory_efficient_attention:
        base.unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    return base
