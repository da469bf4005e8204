"""LoRA adapters (peft) on the UNet and, optionally, the text encoders: which layers, add them, read
their weights out, save them (the one LoRA saver) and load them back for resuming."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config.train import LAYER_SETS
from .errors import UserError
from .families import SD1
from .families.base import is_spatial_conv
from .layout import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, RAW_WEIGHT_NAME
from .lycoris import TITLES, peft_config

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
    block_dims: tuple[int, ...] | None = None  # kohya's per-block ranks: down blocks, middle, up blocks
    block_alphas: tuple[float, ...] | None = None
    network: str = "lora"  # lora | loha | lokr (LyCORIS's, through peft: sdlora/lycoris.py)
    lokr_factor: int = -1  # LoKr's factor (-1: automatic)
    decompose_both: bool = False  # LoKr: the small factor low-rank too
    use_tucker: bool = False  # LoHa/LoKr: Tucker-decomposed 3x3 convs
    rank_dropout: float = 0.0  # LoHa/LoKr
    module_dropout: float = 0.0

    @property
    def adapter_type(self) -> str:
        if self.network != "lora":
            return TITLES[self.network]
        return "DoRA" if self.use_dora else "LoCon" if self.layers == "all" else "LoRA"

    def network_args(self) -> dict[str, str | None]:
        """LyCORIS's ss_network_args entries for a LoHa/LoKr (None where unset; {} for a LoRA)."""
        if self.network == "lora":
            return {}
        return {
            "algo": self.network,
            "factor": str(self.lokr_factor) if self.network == "lokr" else None,
            "decompose_both": "True" if self.decompose_both else None,
            "use_tucker": "True" if self.use_tucker else None,
            "rank_dropout": str(self.rank_dropout) if self.rank_dropout else None,
            "module_dropout": str(self.module_dropout) if self.module_dropout else None,
        }

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
            block_dims=adapter.block_dims,
            block_alphas=adapter.block_alphas,
            network=adapter.network_type,
            lokr_factor=adapter.lokr_factor,
            decompose_both=adapter.decompose_both,
            use_tucker=adapter.use_tucker,
            rank_dropout=adapter.rank_dropout,
            module_dropout=adapter.module_dropout,
        )


def denoiser_lora_config(targets: list[str], denoiser: torch.nn.Module, spec: AdapterSpec, block_ranks=None):
    """peft's LoraConfig (LoHaConfig, LoKrConfig) for the denoiser layers `targets` (the family's layer set,
    or spec.target_modules); spatial convs (LoCon) take the conv rank and alpha; `block_ranks` ({module:
    (rank, alpha)}, from kohya's --block_dims) the others' (rank 0: not adapted)."""
    from peft import LoraConfig

    convs = (
        [n for n in targets if is_spatial_conv(denoiser.get_submodule(n))] if not spec.target_modules else []
    )
    conv_rank = spec.conv_rank or spec.rank
    conv_alpha = spec.conv_alpha if spec.conv_alpha is not None else float(conv_rank)
    ranks = {n: conv_rank for n in convs}
    alphas = {n: conv_alpha for n in convs}
    for module, (rank, alpha) in (block_ranks or {}).items():
        if module not in convs:
            ranks[module], alphas[module] = rank, alpha
    targets = [n for n in targets if ranks.get(n, spec.rank) > 0]
    rank_pattern = {n: r for n, r in ranks.items() if n in targets and r != spec.rank}
    alpha_pattern = {n: a for n, a in alphas.items() if n in targets and a != spec.alpha}
    if spec.network != "lora":
        return peft_config(spec, targets, rank_pattern, alpha_pattern, denoiser)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_dora=spec.use_dora,
        lora_dropout=spec.dropout,
    )


def block_ranks(family, denoiser: torch.nn.Module, targets: list[str], spec: AdapterSpec) -> dict:
    """{module: (rank, alpha)} from kohya's --block_dims / --block_alphas: one value per block, the down
    blocks first, then the middle block(s), then the up blocks (family.block_counts says how many)."""
    counts = family.block_counts(denoiser.config)
    if len(spec.block_dims) != sum(counts) or (spec.block_alphas and len(spec.block_alphas) != sum(counts)):
        raise UserError(
            f"--block_dims and --block_alphas need {sum(counts)} values for this model: {counts[0]} down blocks, "
            f"{counts[1]} middle, {counts[2]} up (got {len(spec.block_dims)})"
        )
    start = {"down": 0, "mid": counts[0], "up": counts[0] + counts[1]}
    out = {}
    for module in targets:
        block = family.lora_block(module, denoiser.config)
        if block is not None:
            i = start[block[0]] + block[1]
            out[module] = (spec.block_dims[i], spec.block_alphas[i] if spec.block_alphas else spec.alpha)
    return out


def text_lora_config(targets: list[str], spec: AdapterSpec, encoder: torch.nn.Module | None = None):
    from peft import LoraConfig

    if spec.network != "lora":
        return peft_config(spec, targets, {}, {}, encoder)
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
    if spec.network != "lora" and not family.kohya_names.diffusers_reads:
        raise UserError(
            f"--network_type {spec.network}: not for {family.title}: kohya's names for it fuse q, k and v, "
            "which a LoHa/LoKr update cannot be split into; use --network_type lora"
        )
    torch.manual_seed(seed)
    targets = list(spec.target_modules) if spec.target_modules else family.lora_targets(denoiser, spec.layers)
    ranks = block_ranks(family, denoiser, targets, spec) if spec.block_dims else None
    denoiser.add_adapter(denoiser_lora_config(targets, denoiser, spec, ranks))
    models = {family.denoiser: denoiser}
    if spec.text_encoder:
        for name, encoder in zip(family.text_encoders, base.text_encoders):
            if name in family.trainable_text_encoders:  # (SD 3.5's T5 stays frozen)
                encoder.add_adapter(text_lora_config(family.text_lora_targets(spec.layers), spec, encoder))
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
    models: dict[str, torch.nn.Module], family, folder: str | Path, metadata: dict[str, str], exported=None
) -> Path:
    """Write both LoRA files into `folder` (the one LoRA saver, for checkpoints and final outputs):
    pytorch_lora_weights.safetensors (diffusers) and pytorch_lora_weights_kohya.safetensors (A1111,
    ComfyUI), each with the adapters' settings and `metadata` in its header. With `exported` (a context
    manager that swaps the exported weights in: an EMA, schedule-free's average) those two hold the exported
    weights, and pytorch_lora_weights_raw.safetensors the weights as trained. All or none: they are written
    beside each other under temporary names and renamed into place only when all are complete."""
    from .lora_weights import weights_from_models, write_diffusers, write_kohya

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME]
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as tmp:
        if exported is not None:
            write_diffusers(weights_from_models(models, family, metadata), Path(tmp) / RAW_WEIGHT_NAME)
            names.append(RAW_WEIGHT_NAME)
        with exported() if exported is not None else contextlib.nullcontext():  # (written while swapped in)
            weights = weights_from_models(models, family, metadata)
            write_kohya(weights, Path(tmp) / KOHYA_WEIGHT_NAME)
            write_diffusers(weights, Path(tmp) / LORA_WEIGHT_NAME)
        for name in names:
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
