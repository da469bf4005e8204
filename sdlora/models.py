"""The base model: where it comes from, its native size, and loading its frozen parts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .tiny_model import ensure_tiny_model


def resolve_model(name_or_path: str | None) -> str:
    """The model to use: the built-in tiny model (built on first use) when none is named."""
    if name_or_path in (None, "", "tiny"):
        return str(ensure_tiny_model())
    path = Path(name_or_path)
    if path.exists() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UserError(
            f"{path}: not a diffusers model folder (no model_index.json); pass a folder saved with "
            "save_pretrained or a Hub model id"
        )
    return name_or_path


def _load_config(model: str, subfolder: str, revision: str | None) -> dict:
    local = Path(model) / subfolder / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(
            Path(hf_hub_download(model, "config.json", subfolder=subfolder, revision=revision)).read_text()
        )
    except Exception as e:  # offline, unknown id, private repo: all end the same way for the user
        raise UserError(
            f"{model}: cannot read {subfolder}/config.json ({type(e).__name__}); check the model id or path"
        ) from None


def native_resolution(model: str, revision: str | None = None) -> int:
    """The resolution the base model was trained at: UNet sample size times the VAE's scale factor."""
    unet = _load_config(model, "unet", revision)
    vae = _load_config(model, "vae", revision)
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return int(unet["sample_size"]) * scale


def load_tokenizer(model: str, revision: str | None = None):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)
    except OSError as e:
        raise UserError(f"{model}: cannot load its tokenizer ({e}); check the model id or path") from None


@dataclass
class BaseModel:
    """The frozen parts of a Stable Diffusion model that LoRA training needs."""

    name: str
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_base_model(model: str, revision: str | None = None, variant: str | None = None) -> BaseModel:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"revision": revision, "variant": variant}
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
        tokenizer = load_tokenizer(model, revision)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw)
    except OSError as e:
        raise UserError(
            f"{model}: cannot load the model ({str(e).splitlines()[0]}); check the id, path or --variant"
        ) from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(model, tokenizer, text_encoder, vae, unet, noise_scheduler)


def load_for_lora_training(args, device: torch.device, weight_dtype: torch.dtype) -> BaseModel:
    """The frozen base model in the half type (if any) on the device, with an fp32 LoRA adapter on the UNet.

    Resolves args.pretrained_model_name_or_path (tiny model by default) and args.resolution (native size).
    """
    from .lora import add_lora, lora_parameters

    args.pretrained_model_name_or_path = resolve_model(args.pretrained_model_name_or_path)
    base = load_base_model(args.pretrained_model_name_or_path, args.revision, args.variant)
    args.resolution = args.resolution or native_resolution(args.pretrained_model_name_or_path, args.revision)
    if args.prediction_type:
        base.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for module in (base.unet, base.vae, base.text_encoder):
        # (a dtype argument, even float32, makes diffusers warn about casting; pass it only when casting)
        module.to(device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    torch.manual_seed(args.seed)  # the adapter's initial weights
    add_lora(base.unet, args.rank, args.lora_alpha)
    for param in lora_parameters(base.unet):
        param.data = param.data.float()  # fp32 LoRA weights (and so fp32 optimizer state) under any precision
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        base.unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    return base
