"""What every objective offers the training step and the held-out loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

# denoise(noisy latents, timesteps) -> the model's prediction (the family knows the call)
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
