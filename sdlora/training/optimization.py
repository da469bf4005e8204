"""The optimizer and learning-rate schedule over the LoRA weights, one parameter group per model part."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def param_groups(
    models: dict[str, torch.nn.Module], denoiser: str, denoiser_lr: float, text_encoder_lr: float
):
    """One group per adapted model: the denoiser's LoRA at `denoiser_lr`, each text encoder's at `text_encoder_lr`."""
    from ..lora import lora_parameters

    return [
        {"params": lora_parameters(model), "lr": denoiser_lr if name == denoiser else text_encoder_lr}
        for name, model in models.items()
    ]


def make_optimizer(groups: list[dict], opt, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights (opt: config.train.OptimizationConfig): bitsandbytes' 8-bit version, or
    torch's (fused on CUDA; on CPU the foreach path is the fast one)."""
    kwargs = dict(
        betas=(opt.adam_beta1, opt.adam_beta2), weight_decay=opt.adam_weight_decay, eps=opt.adam_epsilon
    )
    if opt.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=groups[0]["lr"], **kwargs)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], **kwargs, **fast)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def apply_hyperparameters(optimizer, lr_scheduler, learning_rates: list[float], opt) -> None:
    """Set this run's learning rates, betas, epsilon and weight decay on an optimizer and schedule restored
    from a checkpoint (which restores the checkpoint's own): a --force_resume with other values trains with
    the values it was given, and the files record what was used."""
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, learning_rates)):
        betas = (opt.adam_beta1, opt.adam_beta2)
        group.update(betas=betas, eps=opt.adam_epsilon, weight_decay=opt.adam_weight_decay)
        group["initial_lr"] = lr_scheduler.base_lrs[i] = lr
        group["lr"] = lr * lr_scheduler.lr_lambdas[i](lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    logger.warning("--force_resume: training on with this run's learning rates and AdamW settings")
