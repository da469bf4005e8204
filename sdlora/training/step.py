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
    on the device (and adds each part's, instance and class images', to run.loss_parts). Gradients are
    all-reduced on the last micro-batch only."""
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
            denoise = lambda x, t, inputs=inputs: family.denoise(denoiser, x.to(run.dtype), t, inputs)  # noqa: E731
            loss = example_loss(run, batch, denoise, latents, gen)
            accelerator.backward(loss / len(step.micro_batches))
        loss_sum += loss.detach() / len(step.micro_batches)
    accelerator.clip_grad_norm_(run.params, max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def example_loss(run, batch: dict, denoise, latents: torch.Tensor, generator) -> torch.Tensor:
    """The micro-batch's loss: the objective's mean; in a run with class images or masks, the mean of each
    example's (masked) loss times its weight (--prior_loss_weight for class images: kohya's weighting,
    which the diffusers scripts' instance + weight x prior equals up to a factor 2 when the halves are equal),
    each part's sum noted for the log. The path is the run's, not the batch's: every process logs alike."""
    images = run.conditioning.images
    if not (images.masked or images.has_reg):
        return run.objective.training_loss(denoise, latents, generator)
    masks = run.conditioning.masks(batch, latents.shape[-2:])
    per_example = run.objective.training_losses(denoise, latents, generator, masks)  # (B,)
    if images.has_reg:
        detached, reg = per_example.detach(), batch["reg"]
        for part, chosen in (("instance", ~reg), ("prior", reg)):
            total, count = run.loss_parts.get(part, (0.0, 0))
            run.loss_parts[part] = (
                total + detached[chosen.to(detached.device)].sum(),
                count + int(chosen.sum()),
            )
    return (per_example * batch["weight"].to(latents.device)).mean()
