"""The DDPM objective of Stable Diffusion 1.x, 2.x and XL: noised latents, an epsilon or v-prediction target,
and the loss with its options: the kind (l2, l1, Huber), min-SNR, debiased estimation and v-prediction
scaling weights, the timesteps trained, and the noise (offset, pyramid, perturbation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import Denoise
from .losses import LossOptions, example_means
from .noise import NoiseOptions
from .timesteps import TimestepSampler

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DiffusionObjective:
    """DDPM noising with an epsilon or v-prediction target. Noise, noisy latents and targets are fp32 whatever
    the weights' dtype: in bf16, alphas_cumprod near 1 rounds to 1 and the smallest timesteps would get no
    noise at all."""

    scheduler: object  # a DDPMScheduler with the model's training betas (rescaled for zero terminal SNR)
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    loss: LossOptions = field(default_factory=LossOptions)
    timesteps: TimestepSampler | None = None  # None: uniform over every timestep
    noise: NoiseOptions | None = None  # None: Gaussian plus noise_offset

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(
                f"unsupported prediction type {self.prediction_type!r}; use --prediction_type epsilon or v_prediction"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """fp32 Gaussian noise, with offset noise (https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
        return self._noise_options().sample(latents, generator)[0]

    def _noise_options(self) -> NoiseOptions:
        return self.noise if self.noise is not None else NoiseOptions(offset=self.noise_offset)

    def sample_timesteps(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        sampler = self.timesteps or TimestepSampler(self.num_train_timesteps)
        return sampler.sample(batch, generator, device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noisy_from=None):
        """(noisy latents, training target) in fp32; `noisy_from`: other noise for the noisy latents alone
        (input perturbation), the target still from `noise`."""
        latents, noise = latents.float(), noise.float()
        noisy = self.scheduler.add_noise(
            latents, noise if noisy_from is None else noisy_from.float(), timesteps
        )
        if self.prediction_type == "epsilon":
            return noisy, noise
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-example loss weights, or None for the plain mean. Min-SNR (https://arxiv.org/abs/2303.09556,
        section 3.4): min(SNR, gamma) / SNR for epsilon, divided by SNR + 1 instead for v-prediction; times the
        loss options' debiased-estimation and v-prediction scaling weights."""
        weights = None
        if self.snr_gamma is not None:
            snr = self.snr(timesteps)
            clamped = torch.clamp(snr, max=self.snr_gamma)
            weights = clamped / (snr + 1) if self.v_prediction else clamped / snr
        extra = self.loss.extra_weights(self.snr(timesteps), self.v_prediction)
        if extra is not None:
            weights = extra if weights is None else weights * extra
        return weights

    def weighted_loss(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The batch's loss: each element's (l2, l1 or Huber), averaged per example, weighted, averaged."""
        thresholds = (
            self.loss.thresholds(timesteps, self.scheduler.alphas_cumprod, self.num_train_timesteps)
            if self.loss.needs_thresholds
            else None
        )
        weights = self.loss_weights(timesteps)
        if weights is None and self.loss.loss_type == "l2":
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        per_example = self.loss.elementwise(pred, target, thresholds).mean(dim=(1, 2, 3))
        return (per_example * weights).mean() if weights is not None else per_example.mean()

    def training_loss(
        self, denoise: Denoise, latents: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Noise the latents at sampled timesteps and score the denoiser's prediction: one step's loss."""
        noise, noisy_from = self._noise_options().sample(latents, generator)
        timesteps = self.sample_timesteps(latents.shape[0], generator, latents.device)
        noisy, target = self.noised(
            latents, noise, timesteps, noisy_from if noisy_from is not noise else None
        )
        return self.weighted_loss(denoise(noisy, timesteps), target, timesteps)

    def training_losses(
        self,
        denoise: Denoise,
        latents: torch.Tensor,
        generator: torch.Generator,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each example's weighted loss (B,), from the same draws as training_loss; `masks` (B, 1, h, w)
        weight the latent pixels (losses.example_means): for --masked_loss and class images' own weights."""
        noise, noisy_from = self._noise_options().sample(latents, generator)
        timesteps = self.sample_timesteps(latents.shape[0], generator, latents.device)
        noisy, target = self.noised(
            latents, noise, timesteps, noisy_from if noisy_from is not noise else None
        )
        pred = denoise(noisy, timesteps)
        thresholds = (
            self.loss.thresholds(timesteps, self.scheduler.alphas_cumprod, self.num_train_timesteps)
            if self.loss.needs_thresholds
            else None
        )
        per_example = example_means(self.loss.elementwise(pred, target, thresholds), masks)
        weights = self.loss_weights(timesteps)
        return per_example * weights if weights is not None else per_example

    def probe_losses(
        self, denoise: Denoise, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> list[float]:
        """Per-example plain MSE at given noise and timesteps (no weighting or loss options, so held-out curves
        compare across settings)."""
        noisy, target = self.noised(latents, noise, timesteps)
        pred = denoise(noisy, timesteps)
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).tolist()
