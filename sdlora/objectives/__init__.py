"""Training objectives: how latents are noised, what the denoiser is trained to predict, how the loss is
weighted. The training step and the held-out loss call one object, as DiT's `training_losses(model, x, t)`:
`training_loss(denoise, latents, generator)` and `probe_losses(denoise, latents, noise, timesteps)`, with
`num_train_timesteps`. A new objective (flow matching for SD 3.5) is a module here and a case in
make_objective.
"""

from __future__ import annotations

from ..config.flow import FlowMatchingConfig
from ..errors import UserError
from .base import Denoise
from .diffusion import PREDICTION_TYPES, DiffusionObjective
from .flow import FLOW_MATCHING, FlowMatchingObjective, flow_objective
from .losses import LossOptions
from .noise import NoiseOptions
from .timesteps import TimestepSampler

__all__ = [
    "PREDICTION_TYPES",
    "Denoise",
    "FLOW_MATCHING",
    "DiffusionObjective",
    "FlowMatchingObjective",
    "LossOptions",
    "NoiseOptions",
    "TimestepSampler",
    "make_objective",
    "training_scheduler",
]


def training_scheduler(scheduler, zero_terminal_snr: bool):
    """The base model's DDPM training scheduler, its betas rescaled to zero SNR at the last timestep when asked
    (Lin et al. 2023, arXiv 2305.08891: otherwise the last timestep still shows the image's mean colour)."""
    if not zero_terminal_snr:
        return scheduler
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def make_objective(scheduler, prediction_type: str, objective, loss, timesteps, noise, flow=None):
    """The objective from the configuration's objective, loss, timesteps, noise and flow sections
    (config.train); `scheduler` is the training scheduler (training_scheduler), `prediction_type` the run's:
    flow_matching (the family's, SD 3.5) trains sdlora.objectives.flow's objective, the others DDPM's."""
    if prediction_type == FLOW_MATCHING:
        if noise.zero_terminal_snr:
            raise UserError(
                "--zero_terminal_snr rescales DDPM betas; a flow-matching model (SD 3.5) has none: drop it"
            )
        return flow_objective(
            scheduler,
            flow or FlowMatchingConfig(),
            objective,
            loss,
            timesteps,
            noise_options(objective, noise),
        )
    return DiffusionObjective(
        scheduler,
        prediction_type,
        objective.snr_gamma,
        objective.noise_offset,
        LossOptions(
            loss.loss_type,
            loss.huber_c,
            loss.huber_schedule,
            loss.debiased_estimation_loss,
            loss.scale_v_pred_loss_like_noise_pred,
        ),
        TimestepSampler(
            int(scheduler.config.num_train_timesteps),
            timesteps.min_timestep or 0,
            timesteps.max_timestep,
            timesteps.timestep_sampling,
            timesteps.logit_mean,
            timesteps.logit_std,
            timesteps.sigmoid_scale,
            timesteps.timestep_bias_strategy,
            timesteps.timestep_bias_multiplier,
            timesteps.timestep_bias_portion,
            timesteps.timestep_bias_begin,
            timesteps.timestep_bias_end,
        ),
        noise_options(objective, noise),
    )


def noise_options(objective, noise) -> NoiseOptions:
    """The noise added to the latents, from the objective and noise sections (config.train)."""
    return NoiseOptions(
        objective.noise_offset,
        noise.adaptive_noise_scale,
        noise.multires_noise_iterations,
        noise.multires_noise_discount,
        noise.input_perturbation,
    )
