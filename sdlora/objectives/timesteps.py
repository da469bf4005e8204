"""Which timesteps train: a range, a distribution over it (uniform, logit-normal, sigmoid of a normal), or
diffusers' bias towards earlier, later or a range of timesteps. Every draw comes from the step's generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimestepSampler:
    """Timesteps in [low, high) of a schedule of `count` steps."""

    count: int = 1000
    low: int = 0
    high: int | None = None  # None: count
    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    bias: str = "none"
    bias_multiplier: float = 1.0
    bias_portion: float = 0.25
    bias_begin: int = 0
    bias_end: int = 1000

    @property
    def top(self) -> int:
        return self.count if self.high is None else min(self.high, self.count)

    def bias_weights(self) -> torch.Tensor:
        """diffusers' generate_timestep_weights: every timestep weighs 1, the favoured ones the multiplier
        (the last `portion` for later, the first for earlier, [begin, end) for range); outside [low, high) 0."""
        weights = torch.ones(self.count, dtype=torch.float64)
        favoured = int(self.bias_portion * self.count)
        span = {
            "later": slice(self.count - favoured, None),
            "earlier": slice(0, favoured),
            "range": slice(self.bias_begin, self.bias_end),
        }[self.bias]
        weights[span] *= self.bias_multiplier
        weights[: self.low] = 0
        weights[self.top :] = 0
        return weights / weights.sum()

    def sample(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B,) long timesteps."""
        if self.bias != "none":
            return torch.multinomial(self.bias_weights(), batch, replacement=True, generator=generator).to(
                device
            )
        if self.sampling == "uniform":
            return torch.randint(self.low, self.top, (batch,), generator=generator, device=device)
        normal = torch.randn((batch,), generator=generator, device=device)
        if self.sampling == "logit_normal":  # Esser et al. 2024 (SD3), section 3.1: logit(t) ~ N(mean, std)
            u = torch.sigmoid(normal * self.logit_std + self.logit_mean)
        else:  # kohya's sigmoid sampling: sigmoid(scale * N(0, 1))
            u = torch.sigmoid(normal * self.sigmoid_scale)
        t = self.low + u * (self.top - self.low)
        return t.long().clamp(self.low, self.top - 1)
