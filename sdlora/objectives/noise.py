"""The noise added to the latents: Gaussian, plus offset noise (its adaptive form), pyramid (multi-resolution)
noise and input perturbation. Every draw comes from the step's generator, in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseOptions:
    offset: float = 0.0  # --noise_offset
    adaptive_scale: float | None = None  # --adaptive_noise_scale
    multires_iterations: int = 0  # --multires_noise_iterations
    multires_discount: float = 0.3  # --multires_noise_discount
    perturbation: float = 0.0  # --input_perturbation

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise the target is computed from, noise the noisy latents are made with): the same tensor unless
        input perturbation adds to the second only (Ning et al. 2023, arXiv 2301.11706)."""
        shape, device = latents.shape, latents.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if self.offset:
            # https://www.crosslabs.org/blog/diffusion-with-offset-noise: a per-channel constant lets the model
            # learn very dark and bright images; kohya's adaptive form grows it with each channel's mean.
            offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
            strength = self.offset
            if self.adaptive_scale is not None:
                mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()  # (B, C, 1, 1)
                strength = torch.clamp(self.offset + self.adaptive_scale * mean, min=0.0)
            noise = noise + strength * offset
        if self.multires_iterations:
            noise = self._pyramid(noise, generator)
        if self.perturbation:
            extra = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            return noise, noise + self.perturbation * extra
        return noise, noise

    def _pyramid(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pyramid noise (Wasserman's multi-resolution noise, as kohya's pyramid_noise_like adds it): level i is
        Gaussian noise r^i times smaller (r drawn in [2, 4)), upsampled and weighted by discount^i (level 0 at
        full size); the sum rescaled to unit variance."""
        b, c, h, w = noise.shape
        for i in range(self.multires_iterations):
            r = 2 + 2 * torch.rand((), generator=generator, device=noise.device).item()
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((b, c, hn, wn), generator=generator, device=noise.device)
            noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * self.multires_discount**i
            if hn == 1 or wn == 1:
                break
        return noise / noise.std()
