"""The optimizer and learning-rate schedule over the LoRA weights: which optimizer (kohya's names), its
arguments, and the parameter groups that give each weight its learning rate (per model part, LoRA+'s
lora_B ratio, kohya's block weights)."""

from __future__ import annotations

import ast
import logging
from collections.abc import Callable

import torch

from ..errors import UserError

logger = logging.getLogger(__name__)

# The package each optimizer comes from, for the one-line error when it is missing.
PACKAGES = {
    "AdamW8bit": "bitsandbytes",
    "Lion": "bitsandbytes",
    "Lion8bit": "bitsandbytes",
    "Adafactor": "transformers",
    "Prodigy": "prodigyopt",
    "AdamWScheduleFree": "schedulefree",
    "CAME": "pytorch-optimizer",
}


def optimizer_kind(optimization, optimizer) -> str:
    """The optimizer's name (optimization, optimizer: config.train's OptimizationConfig and OptimizerConfig)."""
    return "AdamW8bit" if optimization.use_8bit_adam else optimizer.optimizer_type or "AdamW"


def parse_optimizer_args(pairs: tuple[str, ...] | None) -> dict:
    """kohya's --optimizer_args key=value ...: numbers, True/False/None, and comma lists as tuples."""
    out = {}
    for pair in pairs or ():
        key, _, text = pair.partition("=")
        values = [_literal(v.strip()) for v in text.split(",")] if "," in text else [_literal(text.strip())]
        out[key.strip()] = tuple(values) if len(values) > 1 else values[0]
    return out


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_optimizer(kind: str) -> None:
    """Fail before any model loads if the chosen optimizer's package cannot be imported."""
    if kind == "AdamW":
        return
    try:
        _constructor(kind)
    except Exception as e:  # ImportError, or a CUDA setup error raised at import (bitsandbytes)
        package = PACKAGES[kind]
        raise UserError(
            f"--optimizer_type {kind} needs {package}, which cannot be used here ({type(e).__name__}: {e}); "
            f"run `pip install {package}` or choose another optimizer"
        ) from None


def _constructor(kind: str) -> Callable:
    if kind in ("AdamW8bit", "Lion", "Lion8bit"):
        import bitsandbytes as bnb

        return {"AdamW8bit": bnb.optim.AdamW8bit, "Lion": bnb.optim.Lion, "Lion8bit": bnb.optim.Lion8bit}[
            kind
        ]
    if kind == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if kind == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if kind == "AdamWScheduleFree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree
    if kind == "CAME":
        from pytorch_optimizer import CAME

        return CAME
    return torch.optim.AdamW


def make_optimizer(
    groups: list[dict], optimization, optimizer, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer over the parameter groups (each with its "lr"). AdamW is torch's (fused on CUDA; on CPU
    the foreach path is the fast one); the others take --adam_weight_decay (and the Adam-like ones
    --adam_beta1/2 and --adam_epsilon) unless --optimizer_args says otherwise."""
    kind = optimizer_kind(optimization, optimizer)
    args = parse_optimizer_args(optimizer.optimizer_args)
    adam = {"betas": (optimization.adam_beta1, optimization.adam_beta2), "eps": optimization.adam_epsilon}
    defaults = {"weight_decay": optimization.adam_weight_decay}
    if kind in ("AdamW", "AdamW8bit", "Prodigy", "AdamWScheduleFree"):
        defaults.update(adam)
    if kind == "AdamW":
        defaults.update({"fused": True} if device.type == "cuda" else {"foreach": True})
    if kind == "Adafactor":  # transformers' defaults turn on its own schedule; kohya's defaults turn it off
        defaults.update(scale_parameter=False, relative_step=False, warmup_init=False)
    options = {**defaults, **args}
    if kind == "Adafactor" and options.get("relative_step"):
        for group in groups:  # it computes its own learning rate (with warmup_init, from 1e-6)
            group["lr"] = None
    try:
        return _constructor(kind)(groups, lr=groups[0]["lr"], **options)
    except TypeError as e:
        raise UserError(f"--optimizer_args for {kind}: {e}") from None


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    """diffusers' schedules; Adafactor's relative-step mode keeps its own (transformers' AdafactorSchedule,
    which reports the rate it uses)."""
    if optimizer.param_groups[0].get("lr") is None:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def param_groups(models: dict[str, torch.nn.Module], rates: Callable[[str, str], float]) -> list[dict]:
    """The trainable weights of each model part grouped by learning rate, in a fixed order (without LoRA+ or
    block weights: one group per part, as checkpoints of earlier versions hold): `rates(part, parameter
    name)` gives each weight's rate."""
    groups: dict[tuple[str, float], list] = {}
    for part, model in models.items():
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((part, rates(part, name)), []).append(param)
    return [{"params": params, "lr": lr} for (_, lr), params in groups.items()]


def learning_rates(schedule, optimizer, denoiser: str, block_of: Callable[[str], tuple[str, int] | None]):
    """rates(part, parameter name): the part's rate (schedule: data.Schedule), times LoRA+'s ratio for lora_B
    (Hayou et al. 2024, arXiv 2402.12354: B learns best at a rate ~16x A's), times kohya's block weight of
    the denoiser module (block_of(module) -> ("down" | "mid" | "up", index))."""
    weights = {"down": optimizer.down_lr_weight, "mid": optimizer.mid_lr_weight, "up": optimizer.up_lr_weight}

    def rates(part: str, name: str) -> float:
        denoising = part == denoiser
        lr = schedule.unet_lr if denoising else schedule.text_encoder_lr
        ratio = optimizer.loraplus_unet_lr_ratio if denoising else optimizer.loraplus_text_encoder_lr_ratio
        ratio = ratio if ratio is not None else optimizer.loraplus_lr_ratio
        if ratio is not None and ".lora_B." in name:
            lr *= ratio
        block = (
            block_of(name.split(".lora_")[0])
            if denoising and any(w is not None for w in weights.values())
            else None
        )
        if block is not None and weights[block[0]] is not None:
            kind, index = block
            if kind == "mid":  # one weight for the middle block(s)
                lr *= weights["mid"]
            elif index < len(weights[kind]):  # (kohya fills the blocks a short list leaves out with 1)
                lr *= weights[kind][index]
        return lr

    return rates


def apply_hyperparameters(optimizer, lr_scheduler, learning_rates: list[float], opt) -> None:
    """Set this run's learning rates, betas, epsilon and weight decay on an optimizer and schedule restored
    from a checkpoint (which restores the checkpoint's own): a --force_resume with other values trains with
    the values it was given, and the files record what was used."""
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, learning_rates)):
        for key, value in (("betas", (opt.adam_beta1, opt.adam_beta2)), ("eps", opt.adam_epsilon)):
            if key in group:
                group[key] = value
        group["weight_decay"] = opt.adam_weight_decay
        group["initial_lr"] = lr_scheduler.base_lrs[i] = lr
        group["lr"] = lr * lr_scheduler.lr_lambdas[i](lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    logger.warning("--force_resume: training on with this run's learning rates and optimizer settings")
