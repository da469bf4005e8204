"""The quality levers' sections: the loss, timestep sampling, noise, EMA of the LoRA weights, the optimizer
and per-parameter learning rates (LoRA+, kohya's block weights). Names are diffusers' where it has one, else
kohya's; every one shapes training, so a resume must keep it (resume=True)."""

from __future__ import annotations

from dataclasses import dataclass

from .flags import flag

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "sigmoid")
TIMESTEP_BIAS = ("none", "earlier", "later", "range")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Adafactor", "Prodigy", "AdamWScheduleFree", "CAME")


@dataclass(frozen=True)
class LossConfig:
    """loss: its kind and how each example's loss is weighted (kohya's names)"""

    loss_type: str = flag(
        "l2", "l2 (MSE), l1, huber (pseudo-Huber) or smooth_l1", choices=LOSS_TYPES, resume=True
    )
    huber_c: float = flag(0.1, "the Huber loss's threshold c (with huber or smooth_l1)", resume=True)
    huber_schedule: str = flag(
        "snr", "c by timestep: constant, exponential (c at the last step), snr (kohya's default)",
        choices=HUBER_SCHEDULES, resume=True,
    )  # fmt: skip
    debiased_estimation_loss: bool = flag(
        False, "weight each example by 1/sqrt(SNR) (v: 1/(SNR+1)), arXiv 2310.08442", resume=True
    )
    scale_v_pred_loss_like_noise_pred: bool = flag(
        False, "v-prediction: scale the loss by SNR/(SNR+1), as an epsilon loss weighs timesteps", resume=True
    )


@dataclass(frozen=True)
class TimestepConfig:
    """timesteps: which are trained, and how often"""

    min_timestep: int | None = flag(None, "the lowest timestep trained (default: 0)", resume=True)
    max_timestep: int | None = flag(None, "one past the highest timestep trained (default: all)", resume=True)
    timestep_sampling: str = flag(
        "uniform", "uniform; logit_normal (--logit_mean, --logit_std); sigmoid (--sigmoid_scale)",
        choices=TIMESTEP_SAMPLINGS, resume=True,
    )  # fmt: skip
    logit_mean: float = flag(0.0, "mean of the logit-normal timestep distribution", resume=True)
    logit_std: float = flag(1.0, "standard deviation of the logit-normal timestep distribution", resume=True)
    sigmoid_scale: float = flag(
        1.0, "scale of the normal draw put through a sigmoid (--timestep_sampling sigmoid)", resume=True
    )
    timestep_bias_strategy: str = flag(
        "none", "favour earlier (less noisy) or later timesteps, or a range (diffusers' SDXL script)",
        choices=TIMESTEP_BIAS, resume=True,
    )  # fmt: skip
    timestep_bias_multiplier: float = flag(
        1.0, "how much more often the favoured timesteps are drawn", resume=True
    )
    timestep_bias_portion: float = flag(0.25, "the favoured share of timesteps (earlier, later)", resume=True)
    timestep_bias_begin: int = flag(0, "first favoured timestep (range)", resume=True)
    timestep_bias_end: int = flag(1000, "one past the last favoured timestep (range)", resume=True)


@dataclass(frozen=True)
class NoiseConfig:
    """noise: what is added to the latents beyond plain Gaussian noise"""

    multires_noise_iterations: int = flag(
        0, "pyramid (multi-resolution) noise levels; 6-10 in kohya's docs", resume=True
    )
    multires_noise_discount: float = flag(0.3, "weight of each coarser pyramid level", resume=True)
    input_perturbation: float = flag(
        0.0, "extra noise on the noisy latents only (arXiv 2301.11706; kohya's ip_noise_gamma)",
        aliases=("ip_noise_gamma",), resume=True,
    )  # fmt: skip
    adaptive_noise_scale: float | None = flag(
        None, "add this times each latent channel's mean magnitude to --noise_offset", resume=True
    )
    zero_terminal_snr: bool = flag(
        False, "rescale the betas to zero SNR at the last timestep (v-prediction models; arXiv 2305.08891)",
        resume=True,
    )  # fmt: skip


@dataclass(frozen=True)
class EMAConfig:
    """EMA: an exponential moving average of the LoRA weights, which validation and the saved LoRA use"""

    use_ema: bool = flag(False, "keep an EMA of the LoRA weights and save it as the LoRA", resume=True)
    ema_decay: float = flag(
        0.999, "the EMA's decay, reached after warm-up (min(decay, (1+n)/(10+n)))", resume=True
    )
    ema_update_interval: int = flag(1, "update the EMA every N optimizer steps", resume=True)
    ema_on_cpu: bool = flag(False, "keep the EMA on the CPU (saves accelerator memory)")


@dataclass(frozen=True)
class OptimizerConfig:
    """optimizer: which one, its arguments, and per-parameter learning rates (kohya's names)"""

    optimizer_type: str | None = flag(
        None, "AdamW (default), AdamW8bit (= --use_8bit_adam), Lion, Lion8bit, Adafactor, Prodigy, "
        "AdamWScheduleFree or CAME", choices=OPTIMIZERS, resume=True,
    )  # fmt: skip
    optimizer_args: tuple[str, ...] | None = flag(
        None, "key=value arguments for the optimizer, e.g. weight_decay=0.1 betas=0.9,0.99", resume=True
    )
    loraplus_lr_ratio: float | None = flag(
        None, "LoRA+: lora_B's learning rate is this times lora_A's (16 in the paper)", resume=True
    )
    loraplus_unet_lr_ratio: float | None = flag(
        None, "LoRA+ ratio of the UNet (default: --loraplus_lr_ratio)", resume=True
    )
    loraplus_text_encoder_lr_ratio: float | None = flag(
        None, "LoRA+ ratio of the text encoders (default: --loraplus_lr_ratio)", resume=True
    )
    down_lr_weight: tuple[float, ...] | None = flag(
        None,
        "learning-rate multipliers of the UNet's down (input) blocks, one per block, kohya's order",
        resume=True,
    )
    mid_lr_weight: float | None = flag(
        None, "learning-rate multiplier of the UNet's middle block", resume=True
    )
    up_lr_weight: tuple[float, ...] | None = flag(
        None, "learning-rate multipliers of the UNet's up (output) blocks, one per block", resume=True
    )


def lever_errors(cfg) -> list[str]:
    """What cannot work among the levers (cfg: config.train.TrainConfig), each as the message the user sees."""
    errors = []
    t, noise, ema, opt = cfg.timesteps, cfg.noise, cfg.ema, cfg.optimizer
    if t.min_timestep is not None and t.max_timestep is not None and t.min_timestep >= t.max_timestep:
        errors.append(f"--min_timestep {t.min_timestep} must be below --max_timestep {t.max_timestep}")
    if any(v is not None and v < 0 for v in (t.min_timestep, t.max_timestep)):
        errors.append("--min_timestep and --max_timestep must be 0 or more")
    if t.timestep_bias_strategy != "none" and t.timestep_bias_multiplier <= 0:
        errors.append("--timestep_bias_multiplier must be above 0")
    if t.timestep_bias_strategy == "range" and not 0 <= t.timestep_bias_begin < t.timestep_bias_end:
        errors.append("--timestep_bias_begin must be 0 or more and below --timestep_bias_end")
    if t.timestep_bias_strategy != "none" and t.timestep_sampling != "uniform":
        errors.append(
            "pass --timestep_bias_strategy or --timestep_sampling, not both (the bias reweights uniform draws)"
        )
    if not 0 < t.timestep_bias_portion <= 1:
        errors.append("--timestep_bias_portion must be in (0, 1]")
    if cfg.loss.huber_c <= 0 or (cfg.loss.huber_schedule == "exponential" and cfg.loss.huber_c >= 1):
        errors.append("--huber_c must be above 0 (and below 1 with --huber_schedule exponential)")
    if noise.multires_noise_iterations < 0 or not 0 < noise.multires_noise_discount <= 1:
        errors.append("--multires_noise_iterations must be 0 or more and --multires_noise_discount in (0, 1]")
    if noise.zero_terminal_snr and cfg.objective.prediction_type == "epsilon":
        errors.append(
            "--zero_terminal_snr needs v-prediction (at zero SNR the noise cannot be predicted): "
            "pass --prediction_type v_prediction"
        )
    if not 0 < ema.ema_decay < 1 or ema.ema_update_interval < 1:
        errors.append("--ema_decay must be in (0, 1) and --ema_update_interval at least 1")
    if opt.optimizer_type and cfg.optimization.use_8bit_adam and opt.optimizer_type != "AdamW8bit":
        errors.append(
            f"--use_8bit_adam is --optimizer_type AdamW8bit; drop one of it and --optimizer_type {opt.optimizer_type}"
        )
    if opt.optimizer_type == "AdamWScheduleFree" and cfg.optimization.lr_scheduler not in (
        "constant",
        "constant_with_warmup",
    ):
        errors.append(
            f"--optimizer_type AdamWScheduleFree replaces the learning-rate schedule: --lr_scheduler "
            f"{cfg.optimization.lr_scheduler} would fight it; use constant (its warm-up: --optimizer_args warmup_steps=N)"
        )
    if opt.optimizer_type == "AdamWScheduleFree" and ema.use_ema:
        errors.append(
            "AdamWScheduleFree averages its own iterates (its eval weights are what is saved); drop --use_ema"
        )
    for arg in opt.optimizer_args or ():
        if "=" not in arg:
            errors.append(f"--optimizer_args {arg!r}: write key=value")
    ratios = (opt.loraplus_lr_ratio, opt.loraplus_unet_lr_ratio, opt.loraplus_text_encoder_lr_ratio)
    if any(r is not None and r <= 0 for r in ratios):
        errors.append("LoRA+ ratios must be above 0")
    adapter = cfg.adapter
    if adapter.block_alphas is not None and adapter.block_dims is None:
        errors.append("--block_alphas needs --block_dims")
    if adapter.block_dims is not None and adapter.lora_target_modules:
        errors.append("--block_dims chooses ranks per block of --lora_layers; drop --lora_target_modules")
    if adapter.block_dims is not None and any(d < 0 for d in adapter.block_dims):
        errors.append("--block_dims must be 0 or more (0: no LoRA in that block)")
    return errors
