"""One optimizer step, and the random streams it draws from: pure functions of (seed, step, micro-batch,
process, stream), so a resumed run draws exactly the noise, timesteps and dropout masks an uninterrupted
run would, without saving any random state."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..faults import trace


def step_seed(seed: int, step: int, micro: int, rank: int, stream: int = 0) -> int:
    """A seed that is a pure function of (seed, step, micro-batch, process, stream)."""
    return int(
        np.random.SeedSequence([seed, step, micro, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-batch (noise, timesteps, latent samples)."""
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return generator.manual_seed(step_seed(seed, step, micro, rank))


def train_step(run, step, batches, accelerator, seed: int, max_grad_norm: float) -> torch.Tensor:
    """One optimizer step over the step's micro-batches (run: training.run.Run); returns the mean loss, still
    on the device. Gradients are all-reduced on the last micro-batch only."""
    loss_sum = torch.zeros((), device=accelerator.device)
    family, denoiser = run.family, run.models[run.family.denoiser]
    for micro in range(len(step.micro_batches)):
        batch = next(batches)
        rank = accelerator.process_index
        trace(rank, "batch", step=step.number, epoch=step.epoch, index=batch["index"].tolist(),
              captions=batch["caption"], crops=[list(c) for c in batch["crop"]])  # fmt: skip
        gen = step_generator(seed, step.number, micro, rank, accelerator.device)
        # The global stream (LoRA dropout draws from it) restarts at each micro-batch too: exact resume.
        torch.manual_seed(step_seed(seed, step.number, micro, rank, stream=1))
        with contextlib.ExitStack() as stack:
            if micro < len(step.micro_batches) - 1:
                for model in run.models.values():
                    stack.enter_context(accelerator.no_sync(model))
            stack.enter_context(accelerator.autocast())
            latents, inputs = run.conditioning.latents(batch, gen), run.conditioning.denoiser_inputs(batch)
            loss = run.objective.training_loss(
                lambda x, t, inputs=inputs: family.denoise(denoiser, x.to(run.dtype), t, inputs), latents, gen
            )
            accelerator.backward(loss / len(step.micro_batches))
        loss_sum += loss.detach() / len(step.micro_batches)
    accelerator.clip_grad_norm_(run.params, max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum
