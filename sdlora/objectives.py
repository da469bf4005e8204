"""Training objectives: how latents are noised, what the denoiser is trained to predict, how the loss is
weighted. The training step and the held-out loss call one object, as DiT's `training_losses(model, x, t)`;
flow matching (SD 3.5) will be a second class with the same methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# denoise(noisy latents, timesteps) -> the model's prediction (the family knows the call)
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DiffusionObjective:
    """DDPM noising (Stable Diffusion 1.x/2.x/XL) with an epsilon or v-prediction target, offset noise and
    min-SNR weighting. Noise, noisy latents and targets are fp32 whatever the weights' dtype: in bf16,
    alphas_cumprod near 1 rounds to 1 and the smallest timesteps would get no noise at all."""

    scheduler: object  # a DDPMScheduler with the model's training betas
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"unsupported prediction type {self.prediction_type!r}; use --prediction_type epsilon or v_prediction"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """fp32 Gaussian noise, plus offset noise with noise_offset: a per-channel constant that lets the model
        learn very dark and bright images (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        if self.noise_offset:
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device
            )  # (B, C, 1, 1)
            noise = noise + self.noise_offset * offset
        return noise

    def sample_timesteps(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """(noisy latents, training target) in fp32."""
        latents, noise = latents.float(), noise.float()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-example loss weights, or None for the plain mean. Min-SNR (https://arxiv.org/abs/2303.09556,
        section 3.4): min(SNR, gamma) / SNR for epsilon, divided by SNR + 1 instead for v-prediction."""
        if self.snr_gamma is None:
            return None
        snr = self.snr(timesteps)
        weights = torch.clamp(snr, max=self.snr_gamma)
        return weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr

    def weighted_loss(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        weights = self.loss_weights(timesteps)
        if weights is None:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_example * weights).mean()

    def training_loss(
        self, denoise: Denoise, latents: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Noise the latents at random timesteps and score the denoiser's prediction: one step's loss."""
        noise = self.sample_noise(latents, generator)
        timesteps = self.sample_timesteps(latents.shape[0], generator, latents.device)
        noisy, target = self.noised(latents, noise, timesteps)
        return self.weighted_loss(denoise(noisy, timesteps), target, timesteps)

    def probe_losses(
        self, denoise: Denoise, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> list[float]:
        """Per-example plain MSE at given noise and timesteps (no weighting, so held-out curves compare
        across settings)."""
        noisy, target = self.noised(latents, noise, timesteps)
        pred = denoise(noisy, timesteps)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).tolist()


def make_objective(scheduler, prediction_type: str | None, snr_gamma: float | None, noise_offset: float):
    """The objective for a base model's noise scheduler; `prediction_type` overrides the scheduler's own."""
    return DiffusionObjective(
        scheduler, prediction_type or scheduler.config.prediction_type, snr_gamma, noise_offset
    )
