"""Flow matching (rectified flow) as SD 3.5 trains: Esser et al. 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis" (arXiv 2403.03206), as the diffusers SD3 script and kohya's implement it.

- Noisy latents on the straight line from data to noise (section 2, eq. 1 with a_t = 1 - t, b_t = t):
  x_t = (1 - sigma) x_0 + sigma eps; the transformer predicts the velocity v = eps - x_0 (its target),
  at timestep sigma x 1000 (what FlowMatchEulerDiscreteScheduler gives it when sampling).
- The noise level: u drawn from a density (section 3.1: logit-normal, sigmoid(N(m, s)); mode,
  f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) of a uniform u; uniform otherwise), then shifted towards
  noise as the scheduler samples, sigma = shift u / (1 + (shift - 1) u) (section 5.3.2, alpha = shift;
  the scheduler's `shift`, 3.0 for SD 3.5), and mapped into [--min_timestep, --max_timestep) / 1000 (kohya's
  order: draw, shift, then the range).
- cosmap and sigma_sqrt weight the loss instead of the draw (the diffusers script's
  compute_loss_weighting_for_sd3): 2 / (pi (1 - 2 sigma + 2 sigma^2)), the cosmap density of section 3.1
  over uniform draws, and sigma^-2.

diffusers' script draws the same u but uses it as an index into the scheduler's descending sigma table, so
its --logit_mean moves the draws the other way; here, as in the paper and kohya, a positive mean means
more noise. It also preconditions by default (predicting x_0 through -sigma v + x_t, which weights the
velocity loss by sigma^2); here the target is the velocity itself, as the paper and kohya train it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .base import Denoise
from .losses import LossOptions, example_means
from .noise import NoiseOptions

FLOW_MATCHING = "flow_matching"  # the prediction type of a flow-matching model (RunSettings, the model card)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified-flow noising with a velocity target; noise levels from a density, shifted and ranged."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigma_range: tuple[float, float] = (0.0, 1.0)  # [--min_timestep, --max_timestep) / 1000
    loss: LossOptions = field(default_factory=LossOptions)
    noise: NoiseOptions = field(default_factory=NoiseOptions)

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(
                f"--weighting_scheme {self.weighting_scheme!r}: use one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        if self.shift <= 0:
            raise UserError(f"--timestep_shift {self.shift}: must be above 0 (1: no shift)")

    def sample_u(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B,) fp32 draws in (0, 1) from the scheme's density (uniform for cosmap, sigma_sqrt and none)."""
        if self.weighting_scheme == "logit_normal":
            normal = torch.randn((batch,), generator=generator, device=device, dtype=torch.float32)
            return torch.sigmoid(self.logit_mean + self.logit_std * normal)
        u = torch.rand((batch,), generator=generator, device=device, dtype=torch.float32)
        if self.weighting_scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def shifted(self, u: torch.Tensor) -> torch.Tensor:
        """The timestep shift of SD3 (section 5.3.2): more noise for shift > 1, the identity at 1."""
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sample_sigmas(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B,) fp32 noise levels of a batch."""
        low, high = self.sigma_range
        return low + (high - low) * self.shifted(self.sample_u(batch, generator, device))

    @staticmethod
    def noised(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, noisy_from=None):
        """(noisy latents, velocity target) in fp32; `noisy_from`: other noise for the noisy latents alone
        (input perturbation), the target still from `noise`."""
        latents, noise = latents.float(), noise.float()
        s = sigmas.float().view(-1, *[1] * (latents.ndim - 1))  # (B, 1, 1, 1)
        noisy = (1 - s) * latents + s * (noise if noisy_from is None else noisy_from.float())
        return noisy, noise - latents

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """Per-example loss weights of cosmap and sigma_sqrt; None (the plain mean) for the others."""
        if self.weighting_scheme == "sigma_sqrt":
            return sigmas.float() ** -2.0
        if self.weighting_scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
        return None

    def thresholds(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The Huber threshold of each example by its noise level, kohya's schedules with the flow's
        noise-to-signal ratio sigma / (1 - sigma) in place of DDPM's."""
        c = self.loss.huber_c
        if self.loss.huber_schedule == "exponential":
            return torch.exp(sigmas.float() * math.log(c))
        if self.loss.huber_schedule == "snr":
            ratio = sigmas.float() / (1 - sigmas.float()).clamp(min=1e-6)
            return (1 - c) / (1 + ratio) ** 2 + c
        return torch.full_like(sigmas.float(), c)

    def weighted_loss(self, pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The batch's loss: each element's (l2, l1 or Huber), averaged per example, weighted, averaged."""
        thresholds = self.thresholds(sigmas) if self.loss.needs_thresholds else None
        per_example = self.loss.elementwise(pred, target, thresholds).flatten(1).mean(dim=1)
        weights = self.loss_weights(sigmas)
        return (per_example * weights).mean() if weights is not None else per_example.mean()

    def training_loss(
        self, denoise: Denoise, latents: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Noise the latents at drawn noise levels and score the predicted velocity: one step's loss."""
        noise, noisy_from = self.noise.sample(latents, generator)
        sigmas = self.sample_sigmas(latents.shape[0], generator, latents.device)
        noisy, target = self.noised(latents, noise, sigmas, noisy_from if noisy_from is not noise else None)
        return self.weighted_loss(denoise(noisy, sigmas * self.num_train_timesteps), target, sigmas)

    def training_losses(
        self,
        denoise: Denoise,
        latents: torch.Tensor,
        generator: torch.Generator,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each example's weighted loss (B,), from the same draws as training_loss; `masks` (B, 1, h, w)
        weight the latent pixels (losses.example_means): for --masked_loss and class images' own weights."""
        noise, noisy_from = self.noise.sample(latents, generator)
        sigmas = self.sample_sigmas(latents.shape[0], generator, latents.device)
        noisy, target = self.noised(latents, noise, sigmas, noisy_from if noisy_from is not noise else None)
        pred = denoise(noisy, sigmas * self.num_train_timesteps)
        thresholds = self.thresholds(sigmas) if self.loss.needs_thresholds else None
        per_example = example_means(self.loss.elementwise(pred, target, thresholds), masks)
        weights = self.loss_weights(sigmas)
        return per_example * weights if weights is not None else per_example

    def probe_losses(
        self, denoise: Denoise, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> list[float]:
        """Per-example plain MSE at fixed sigmas, timestep / 1000 (unshifted and unweighted, so held-out
        curves compare across --timestep_shift and --weighting_scheme)."""
        sigmas = timesteps.float() / self.num_train_timesteps
        noisy, target = self.noised(latents, noise, sigmas)
        pred = denoise(noisy, sigmas * self.num_train_timesteps)
        return ((pred.float() - target) ** 2).flatten(1).mean(dim=1).tolist()


def flow_objective(scheduler, flow, objective, loss, timesteps, noise: NoiseOptions) -> FlowMatchingObjective:
    """The flow objective of a FlowMatchEulerDiscreteScheduler model from the configuration's sections
    (config.train: FlowMatchingConfig, ObjectiveConfig, LossConfig, TimestepConfig); options with no
    meaning for flow matching are refused, naming what to use instead."""
    refused = {
        "--snr_gamma (min-SNR weights DDPM timesteps; use --weighting_scheme)": objective.snr_gamma
        is not None,
        "--debiased_estimation_loss": loss.debiased_estimation_loss,
        "--scale_v_pred_loss_like_noise_pred": loss.scale_v_pred_loss_like_noise_pred,
        "--timestep_sampling (use --weighting_scheme: logit_normal reads --logit_mean/--logit_std)": (
            timesteps.timestep_sampling != "uniform"
        ),
        "--timestep_bias_strategy (use --weighting_scheme or --timestep_shift)": (
            timesteps.timestep_bias_strategy != "none"
        ),
    }
    for what, given in refused.items():
        if given:
            raise UserError(f"{what}: not for a flow-matching model (SD 3.5); drop it")
    count = int(scheduler.config.num_train_timesteps)
    low = (timesteps.min_timestep or 0) / count
    high = (timesteps.max_timestep if timesteps.max_timestep is not None else count) / count
    return FlowMatchingObjective(
        num_train_timesteps=count,
        shift=flow.timestep_shift if flow.timestep_shift is not None else float(scheduler.config.shift),
        weighting_scheme=flow.weighting_scheme,
        logit_mean=timesteps.logit_mean,
        logit_std=timesteps.logit_std,
        mode_scale=flow.mode_scale,
        sigma_range=(low, min(high, 1.0)),
        loss=LossOptions(loss.loss_type, loss.huber_c, loss.huber_schedule),
        noise=noise,
    )
