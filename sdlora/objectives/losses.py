"""Loss kinds and per-example weightings (kohya's names), on per-element differences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# kohya clamps the SNR here: at timestep 0 it is in the thousands, and 1/sqrt(SNR) weights would vanish.
SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """The loss's kind (l2, l1, huber, smooth_l1) with its threshold schedule, and extra weightings."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False
    scale_v_pred_like_noise_pred: bool = False

    def thresholds(
        self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, num_timesteps: int
    ) -> torch.Tensor:
        """The Huber threshold c of each example, by its timestep (kohya's schedules): constant; exponential,
        c^(t/T), from 1 at t=0 down to c at the last timestep; snr, (1 - c) / (1 + sigma_t)^2 + c with
        sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): near 1 (L2-like) where there is little noise."""
        t = timesteps.float()
        if self.huber_schedule == "exponential":
            return torch.exp(t * math.log(self.huber_c) / num_timesteps)
        if self.huber_schedule == "snr":
            a = alphas_cumprod.to(timesteps.device)[timesteps].float()
            sigmas = ((1.0 - a) / a) ** 0.5
            return (1 - self.huber_c) / (1 + sigmas) ** 2 + self.huber_c
        return torch.full_like(t, self.huber_c)

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The loss of every element: squared or absolute error, or the pseudo-Huber loss 2c(sqrt(d^2 + c^2)
        - c), which is L2-like below c and L1-like above it (smooth_l1: the same without the factor c)."""
        pred, target = pred.float(), target.float()
        if self.loss_type == "l2":
            return F.mse_loss(pred, target, reduction="none")
        if self.loss_type == "l1":
            return F.l1_loss(pred, target, reduction="none")
        c = c.view(-1, *[1] * (pred.ndim - 1))  # (B, 1, 1, 1)
        smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
        return c * smooth if self.loss_type == "huber" else smooth

    @property
    def needs_thresholds(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")

    def extra_weights(self, snr: torch.Tensor, v_prediction: bool) -> torch.Tensor | None:
        """Debiased estimation (arXiv 2310.08442: 1/sqrt(SNR), or 1/(SNR + 1) for v) and kohya's
        scale_v_pred_loss_like_noise_pred (SNR/(SNR + 1)), multiplied; None when neither is on."""
        snr = torch.clamp(snr, max=SNR_CAP)
        weights = None
        if self.scale_v_pred_like_noise_pred and v_prediction:
            weights = snr / (snr + 1)
        if self.debiased_estimation:
            debias = 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)
            weights = debias if weights is None else weights * debias
        return weights


def example_means(elementwise: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Each example's mean loss (B,). With masks (B, 1, h, w) in [0, 1], the mask-weighted mean
    sum(loss * m) / sum(m): normalised by the mask's area, so a subject filling a tenth of the picture is
    not learned ten times more slowly than one filling all of it (kohya's --masked_loss multiplies without
    normalising; OneTrainer normalises as here). An all-black mask counts nothing."""
    if masks is None:
        return elementwise.flatten(1).mean(dim=1)
    m = masks.to(elementwise.dtype).expand_as(elementwise)
    return (elementwise * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp(min=1e-8)
