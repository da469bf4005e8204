"""Stopping a run together: stop requests (Ctrl-C, SIGTERM) and non-finite losses, agreed by every process."""

from __future__ import annotations

import signal

import torch

from ..errors import UserError


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits.
    A second signal is not caught: a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)  # the second one ends the process at once

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree(accelerator, stop: bool, bad_step: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """The stop request and first non-finite step, agreed by every process (one small all-reduce), so that
    all of them leave the loop at the same step instead of some waiting forever in a collective."""
    if accelerator.num_processes == 1:
        return stop, bad_step
    import torch.distributed as dist

    flags = torch.stack([torch.tensor(float(stop), device=bad_step.device), bad_step.float()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), flags[1].long()


def check_finite(bad_step: torch.Tensor, last_checkpoint) -> None:
    """Stop the run, naming the step, if any step's loss was NaN or infinite (reading it waits for the GPU)."""
    step = int(bad_step.item())
    if step >= 0:
        where = (
            f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        )
        raise UserError(
            f"loss became NaN or infinite at step {step}; nothing more was saved ({where}); "
            "lower --learning_rate or use --mixed_precision bf16/no"
        )
