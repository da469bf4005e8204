"""An exponential moving average (EMA) of the LoRA weights, and the weights a run exports.

The EMA is kept in fp32, updated after every `interval` optimizer steps with diffusers' EMAModel warm-up,
decay_n = min(decay, (1 + n) / (10 + n)) for the n-th update, so the average does not start out dominated by
the initial weights. It is a pure function of the weights at each update, so a resumed run continues it bit
for bit from the checkpoint's copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class LoraEMA:
    """The EMA of a list of parameters (the LoRA weights), on their device or on the CPU."""

    def __init__(
        self, params: list[torch.nn.Parameter], decay: float, interval: int = 1, on_cpu: bool = False
    ):
        self.params, self.decay, self.interval = params, decay, interval
        self.shadow = [p.detach().to("cpu" if on_cpu else p.device, torch.float32, copy=True) for p in params]
        self.updates = 0

    def decay_at(self, n: int) -> float:
        """The decay of the n-th update (0-based)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based): shadow = d * shadow + (1 - d) * weights, every interval steps."""
        if step % self.interval:
            return
        weight = 1.0 - self.decay_at(self.updates)
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the parameters for the block (validation, held-out loss, saving); the trained
        weights back after, exactly."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.device, param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained):
                    param.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {str(i): s.detach().to("cpu").contiguous() for i, s in enumerate(self.shadow)}
        state["updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[str(i)])
        self.updates = int(state["updates"])


@contextlib.contextmanager
def exported(ema: LoraEMA | None, optimizer, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The weights a run exports, in the models for the block: the EMA when there is one, schedule-free's
    averaged point otherwise (its optimizer's eval mode: https://github.com/facebookresearch/schedule_free);
    the trained weights (and the optimizer's train mode) back after, exactly: eval() and train() are lerps
    whose round trip rounds, which would make a run that saved a checkpoint differ from one resumed from it."""
    if ema is not None:
        with ema.applied():
            yield
        return
    inner = getattr(optimizer, "optimizer", optimizer)  # (accelerate wraps the optimizer)
    trained = [p.detach().clone() for p in params]
    inner.eval()
    try:
        yield
    finally:
        inner.train()
        with torch.no_grad():
            for param, value in zip(params, trained):
                param.copy_(value)
