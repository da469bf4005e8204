"""The flow-matching section (SD 3.5): how noise levels are drawn and the loss weighted, with the diffusers
SD3 script's names (--logit_mean and --logit_std are the timesteps section's, shared with DDPM models)."""

from __future__ import annotations

from dataclasses import dataclass

from .flags import flag

# (sdlora.objectives.flow.WEIGHTING_SCHEMES; the configuration does not import the objectives)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """flow matching (SD 3.5): the noise levels trained and the loss's weighting (diffusers' SD3 script's names)"""

    weighting_scheme: str = flag(
        "logit_normal",
        "logit_normal (--logit_mean, --logit_std) or mode (--mode_scale): the density noise levels are drawn "
        "from; cosmap, sigma_sqrt: loss weights over uniform draws; none: uniform (SD3 paper, section 3.1)",
        choices=WEIGHTING_SCHEMES,
        resume=True,
    )
    mode_scale: float = flag(1.29, "the mode density's scale s (--weighting_scheme mode)", resume=True)
    timestep_shift: float | None = flag(
        None,
        "shift the noise levels towards noise: shift*t / (1 + (shift-1)*t) (default: the scheduler's, 3.0 "
        "for SD 3.5; 1: none)",
        aliases=("flow_shift",),
        resume=True,
    )


def flow_errors(cfg) -> list[str]:
    """What is wrong with the SD 3.5 settings (cfg: config.train.TrainConfig), each as the message the user sees."""
    errors = []
    if cfg.flow.timestep_shift is not None and cfg.flow.timestep_shift <= 0:
        errors.append(f"--timestep_shift {cfg.flow.timestep_shift}: must be above 0 (1: no shift)")
    if cfg.model.t5_max_length < 1:
        errors.append("--t5_max_length must be at least 1")
    return errors
