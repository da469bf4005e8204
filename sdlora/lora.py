"""LoRA adapters (peft) on the UNet and, optionally, the text encoders: which layers, add them, read
their weights out, save them (the one LoRA saver) and load them back for resuming."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The same weights under kohya's key names, which AUTOMATIC1111 and ComfyUI load as they are. diffusers'
# load_lora_weights(folder) still picks LORA_WEIGHT_NAME when both are in a folder.
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
LAYER_SETS = ("attn", "attn_ff", "all")
# The UNet's attention projections: what the diffusers example trains.
ATTENTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# kohya's LoRA: every Linear and 1x1 conv inside the transformer blocks (Transformer2DModel).
IN_TRANSFORMER = re.compile(r"\.attentions\.\d+\.")
# kohya's LoCon adds the ResNet blocks and the down/up-samplers.
IN_RESNET = re.compile(r"\.resnets\.\d+\.|\.(down|up)samplers\.\d+\.conv$")
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP = ["fc1", "fc2"]


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


def _is_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | torch.nn.Conv2d)


def _is_3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def unet_targets(unet: torch.nn.Module, spec: AdapterSpec) -> list[str]:
    """Full names of the UNet layers that get a LoRA."""
    if spec.target_modules:
        return list(spec.target_modules)
    names = []
    for name, module in unet.named_modules():
        if not _is_layer(module):
            continue
        if spec.layers == "attn":
            chosen = bool(ATTENTION.search(name))
        else:
            chosen = bool(IN_TRANSFORMER.search(name)) and not _is_3x3(module)
            chosen |= spec.layers == "all" and bool(IN_RESNET.search(name))
        if chosen:
            names.append(name)
    return names


def unet_lora_config(unet: torch.nn.Module, spec: AdapterSpec):
    from peft import LoraConfig

    targets = unet_targets(unet, spec)
    convs = [n for n in targets if _is_3x3(unet.get_submodule(n))] if not spec.target_modules else []
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


def text_lora_config(spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=TEXT_ATTENTION + (TEXT_MLP if spec.layers != "attn" else []),
        use_dora=spec.use_dora,
        lora_dropout=spec.dropout,
    )


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Attach a trainable LoRA adapter to the UNet's attention projections (the default layer set)."""
    unet.add_adapter(unet_lora_config(unet, AdapterSpec(rank=rank, alpha=alpha)))


def add_adapters(base, spec: AdapterSpec, seed: int) -> dict[str, torch.nn.Module]:
    """Attach fp32 LoRA adapters to the UNet and (with spec.text_encoder) the text encoders; return the
    adapted models by pipeline component name. The initial weights are a function of the seed."""
    from peft import get_peft_model  # noqa: F401  (peft must be importable for add_adapter)

    torch.manual_seed(seed)
    base.unet.add_adapter(unet_lora_config(base.unet, spec))
    models = {"unet": base.unet}
    if spec.text_encoder:
        for name, encoder in zip(base.family.text_encoders, base.text_encoders):
            encoder.add_adapter(text_lora_config(spec))
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
    ComfyUI), each with the adapters' settings and `metadata` in its header."""
    from .lora_weights import weights_from_models, write_diffusers, write_kohya

    folder = Path(folder)
    weights = weights_from_models(models, family.name, metadata)
    write_kohya(weights, folder / KOHYA_WEIGHT_NAME)
    return write_diffusers(weights, folder / LORA_WEIGHT_NAME)


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
