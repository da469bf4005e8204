"""LoRA adapters (peft) on the UNet and, optionally, the text encoders: which layers, add them, read
their weights out, save them (the one LoRA saver) and load them back for resuming."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config.train import LAYER_SETS
from .families import SD1
from .families.base import is_spatial_conv
from .layout import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

__all__ = ["KOHYA_WEIGHT_NAME", "LAYER_SETS", "LORA_WEIGHT_NAME"]  # (re-exported for callers)


@dataclass(frozen=True)
class AdapterSpec:
    """What is trained: the layer set, rank and alpha (and the 3x3 convs' with LoCon), DoRA, dropout."""

    rank: int = 4
    alpha: float = 4.0
    layers: str = "attn"  # attn | attn_ff | all
    target_modules: tuple[str, ...] | None = None  # explicit module names or suffixes, for experts
    conv_rank: int | None = None  # kohya's conv_dim; default: rank
    conv_alpha: float | None = None  # kohya's conv_alpha; default: conv rank
    use_dora: bool = False
    dropout: float = 0.0
    text_encoder: bool = False  # also train LoRA on the text encoder(s)

    @property
    def adapter_type(self) -> str:
        return "DoRA" if self.use_dora else "LoCon" if self.layers == "all" else "LoRA"

    @classmethod
    def from_config(cls, adapter) -> AdapterSpec:
        """The spec of the adapter section of a configuration (config.train.AdapterConfig)."""
        return cls(
            rank=adapter.rank,
            alpha=adapter.lora_alpha if adapter.lora_alpha is not None else float(adapter.rank),
            layers=adapter.lora_layers,
            target_modules=tuple(adapter.lora_target_modules) if adapter.lora_target_modules else None,
            conv_rank=adapter.conv_rank,
            conv_alpha=adapter.conv_alpha,
            use_dora=adapter.use_dora,
            dropout=adapter.lora_dropout,
            text_encoder=adapter.train_text_encoder,
        )


def denoiser_lora_config(targets: list[str], denoiser: torch.nn.Module, spec: AdapterSpec):
    """peft's LoraConfig for the denoiser layers `targets` (the family's layer set, or spec.target_modules);
    spatial convs (LoCon) take the conv rank and alpha."""
    from peft import LoraConfig

    convs = (
        [n for n in targets if is_spatial_conv(denoiser.get_submodule(n))] if not spec.target_modules else []
    )
    conv_rank = spec.conv_rank or spec.rank
    conv_alpha = spec.conv_alpha if spec.conv_alpha is not None else float(conv_rank)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern={n: conv_rank for n in convs} if conv_rank != spec.rank else {},
        alpha_pattern={n: conv_alpha for n in convs} if conv_alpha != spec.alpha else {},
        use_dora=spec.use_dora,
        lora_dropout=spec.dropout,
    )


def text_lora_config(targets: list[str], spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=spec.use_dora,
        lora_dropout=spec.dropout,
    )


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Attach a trainable LoRA adapter to a UNet's attention projections (the default layer set)."""
    spec = AdapterSpec(rank=rank, alpha=alpha)
    unet.add_adapter(denoiser_lora_config(SD1.lora_targets(unet, "attn"), unet, spec))


def add_adapters(base, spec: AdapterSpec, seed: int) -> dict[str, torch.nn.Module]:
    """Attach fp32 LoRA adapters to the denoiser and (with spec.text_encoder) the text encoders; return the
    adapted models by pipeline component name. The initial weights are a function of the seed."""
    from peft import get_peft_model  # noqa: F401  (peft must be importable for add_adapter)

    family, denoiser = base.family, base.denoiser
    torch.manual_seed(seed)
    targets = list(spec.target_modules) if spec.target_modules else family.lora_targets(denoiser, spec.layers)
    denoiser.add_adapter(denoiser_lora_config(targets, denoiser, spec))
    models = {family.denoiser: denoiser}
    if spec.text_encoder:
        for name, encoder in zip(family.text_encoders, base.text_encoders):
            encoder.add_adapter(text_lora_config(family.text_lora_targets(spec.layers), spec))
            models[name] = encoder
    for model in models.values():
        for param in lora_parameters(model):
            param.data = (
                param.data.float()
            )  # fp32 LoRA weights (and so fp32 optimizer state) under any precision
    return models


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_lora_files(
    models: dict[str, torch.nn.Module], family, folder: str | Path, metadata: dict[str, str]
) -> Path:
    """Write both LoRA files into `folder` (the one LoRA saver, for checkpoints and final outputs):
    pytorch_lora_weights.safetensors (diffusers) and pytorch_lora_weights_kohya.safetensors (A1111,
    ComfyUI), each with the adapters' settings and `metadata` in its header. Both or neither: they are
    written beside each other under temporary names and renamed into place only when both are complete."""
    from .lora_weights import weights_from_models, write_diffusers, write_kohya

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = weights_from_models(models, family, metadata)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        write_kohya(weights, Path(tmp) / KOHYA_WEIGHT_NAME)
        write_diffusers(weights, Path(tmp) / LORA_WEIGHT_NAME)
        for name in (KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME):
            os.replace(Path(tmp) / name, folder / name)
    return folder / LORA_WEIGHT_NAME


def load_lora_into_models(models: dict[str, torch.nn.Module], file: str | Path) -> None:
    """Set the adapters' weights from a file our saver wrote (for resuming training)."""
    from peft.utils import set_peft_model_state_dict

    from .lora_files import read_lora

    weights = read_lora(file)
    for part, model in models.items():
        own = weights.parts.get(part)
        if not own:
            raise ValueError(f"{file}: holds no {part} LoRA weights")
        if part != "unet" and not hasattr(
            model, "text_model"
        ):  # transformers 5's CLIPTextModel has no such root
            own = {k.removeprefix("text_model."): v for k, v in own.items()}
        result = set_peft_model_state_dict(model, own)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{file}: keys that do not fit this {part}: {unexpected[:3]}")
