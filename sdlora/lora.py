"""LoRA adapters on the UNet: add them, read them out, save them (the one LoRA saver), load them back."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .fileio import atomic_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The same weights under kohya's key names, which AUTOMATIC1111 and ComfyUI load as they are. diffusers'
# load_lora_weights(folder) still picks LORA_WEIGHT_NAME when both are in a folder.
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
# The UNet's attention projections: what the diffusers example and kohya's default LoRA train.
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def add_lora(unet: torch.nn.Module, rank: int, alpha: float) -> None:
    """Attach a trainable LoRA adapter (peft) to the UNet's attention projections."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    unet.add_adapter(config)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under diffusers' key names, as fp32 CPU tensors."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _adapter_metadata(unet: torch.nn.Module) -> dict:
    # Saved beside the weights so that loaders apply the same lora_alpha (the scale is alpha / rank).
    return unet.peft_config["default"].to_dict()


def save_lora(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write folder/pytorch_lora_weights.safetensors in the diffusers format, atomically."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict(unet),
            unet_lora_adapter_metadata=_adapter_metadata(unet),
            safe_serialization=True,
        )
        os.replace(Path(tmp) / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    return folder / LORA_WEIGHT_NAME


def save_kohya_copy(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write folder/pytorch_lora_weights_kohya.safetensors: `lora_unet_<module>.lora_down/lora_up.weight`
    plus `.alpha` (our lora_alpha, so the strength matches), the format A1111 and ComfyUI read."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    alpha = float(unet.peft_config["default"].lora_alpha)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = {
        k: torch.tensor(alpha) if k.endswith(".alpha") else v.detach().to("cpu", torch.float32).contiguous()
        for k, v in convert_state_dict_to_kohya(peft_state).items()  # (it sets every alpha to the rank)
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet.peft_config["default"].r),
        "ss_network_alpha": str(alpha),
    }  # what kohya's own files carry, shown by A1111
    with atomic_file(folder / KOHYA_WEIGHT_NAME) as tmp:
        save_file(kohya, str(tmp), metadata=metadata)
    return folder / KOHYA_WEIGHT_NAME


def load_lora_into_unet(unet: torch.nn.Module, file: str | Path) -> None:
    """Set the UNet's adapter weights from a file our saver wrote (for resuming training)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(file))
    prefix = "unet."
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    from diffusers.utils import convert_unet_state_dict_to_peft

    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{file}: keys that do not fit this UNet: {unexpected[:3]}")
