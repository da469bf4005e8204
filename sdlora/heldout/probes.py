"""The held-out loss: fixed examples scored at fixed timesteps with fixed noise, deterministically.

Latents are the deterministic means of the images' latent distributions at a fixed crop, captions are the
examples' own (no dropout or shuffling), every trained module runs in eval mode (LoRA dropout off), and
(example, timestep) pairs are batched in a fixed order: the same weights give bit-identical numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..cache import scale_latents
from ..families import SD1, Geometry
from .split import probe_crop, probe_noise


@contextlib.contextmanager
def evaluating(modules: Sequence[torch.nn.Module]):
    """Every module (and submodule) in eval mode for the block, each restored to its own mode after: a model
    with frozen parts kept in eval mode comes back exactly as it was. Used by the held-out loss and the
    validation images, which must not depend on LoRA dropout's random masks."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class ProbeExample:
    """One scored image: its dataset index (which keys its noise), its deterministic latent and its denoiser
    conditioning as per-example tensors without a batch dimension."""

    index: int
    latents: torch.Tensor  # (C, h, w) fp32, e.g. LatentCache.mean(index, flip=False)
    unet_inputs: dict  # e.g. {"encoder_hidden_states": (77, D)}, SDXL adds {"added_cond_kwargs": {...}}


def split_inputs(inputs: dict) -> list[dict]:
    """A batched UNet-input dict (as Family.denoiser_inputs returns) as one dict per example: the inverse of
    collate_inputs, for building ProbeExamples from a batched text-encoder call."""
    sizes = {len(v) for v in _leaves(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"inputs of different batch sizes: {sorted(sizes)}")
    return [_select(inputs, i) for i in range(sizes.pop())]


def _leaves(inputs: dict) -> list[torch.Tensor]:
    out = []
    for value in inputs.values():
        if isinstance(value, dict):
            out.extend(_leaves(value))
        elif value is not None:
            out.append(value)
    return out


def _select(inputs: dict, i: int) -> dict:
    return {
        k: _select(v, i) if isinstance(v, dict) else (None if v is None else v[i]) for k, v in inputs.items()
    }


def collate_inputs(inputs: list[dict], device, dtype: torch.dtype) -> dict:
    """Stack per-example UNet inputs (nested dicts of tensors) into a batch on `device`; floating tensors
    are cast to `dtype`, the UNet's."""
    first = inputs[0]
    batch = {}
    for key, value in first.items():
        if isinstance(value, dict):
            batch[key] = collate_inputs([x[key] for x in inputs], device, dtype)
        elif value is None:
            batch[key] = None
        else:
            stacked = torch.stack([x[key] for x in inputs])
            batch[key] = stacked.to(device, dtype if stacked.is_floating_point() else stacked.dtype)
    return batch


def heldout_loss(
    denoiser: torch.nn.Module,
    examples: Sequence[ProbeExample],
    timesteps: Sequence[int],
    objective,
    seed: int,
    dtype: torch.dtype,
    device,
    batch_size: int = 8,
    denoise: Callable = SD1.denoise,
) -> dict[int, float]:
    """Mean plain MSE (the objective's target, no loss weighting, so curves compare across settings) of the
    denoiser's prediction per probe timestep over `examples`, with each (example, timestep)'s fixed noise.

    `denoise(model, noisy, timesteps, inputs)` is the family's call. In eval mode and without gradients.
    Examples of the same latent shape (one aspect-ratio bucket) are batched together, (example, timestep)
    pairs in a fixed order, so the same examples and weights give bit-identical numbers on one machine.
    """
    if not examples:
        raise ValueError("heldout_loss needs at least one example")
    groups: dict[tuple[int, ...], list[ProbeExample]] = {}
    for example in examples:  # first-seen order: deterministic for a given list
        groups.setdefault(tuple(example.latents.shape), []).append(example)
    sums = dict.fromkeys(timesteps, 0.0)
    with evaluating([denoiser]), torch.no_grad():
        for shape, group in groups.items():
            pairs = [(example, t) for example in group for t in timesteps]
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                latents = torch.stack([e.latents for e, _ in chunk]).to(device, torch.float32)  # (B, C, h, w)
                noise = torch.stack([probe_noise(seed, e.index, t, shape) for e, t in chunk]).to(device)
                steps = torch.tensor([t for _, t in chunk], device=device, dtype=torch.long)
                inputs = collate_inputs([e.unet_inputs for e, _ in chunk], device, dtype)
                losses = objective.probe_losses(
                    lambda x, t, inputs=inputs: denoise(denoiser, x.to(dtype), t, inputs),
                    latents,
                    noise,
                    steps,
                )
                for (_, t), value in zip(chunk, losses):
                    sums[t] += value
    return {t: sums[t] / len(examples) for t in timesteps}


def mean_loss(per_t: dict[int, float]) -> float:
    """The loss averaged over the probe timesteps (each weighs the same)."""
    return sum(per_t[t] for t in sorted(per_t)) / len(per_t)


@dataclass
class ProbeSet:
    """Examples scored by the fixed-noise loss: their pictures and captions, and their latent cache if any."""

    images: object  # data.TrainImages
    cache: object | None  # cache.LatentCache
    indices: list[int]


class LossProbes:
    """The held-out loss and the same loss on a fixed sample of training images, evaluated on demand.

    Latents are computed once (from the cache when it is on); the captions are encoded at each evaluation
    (cheap, and right when the text encoder is trained).
    """

    def __init__(
        self, base, objective, heldout: ProbeSet, train: ProbeSet, timesteps, seed: int, device, dtype
    ):
        self.base, self.objective, self.timesteps = base, objective, timesteps
        self.sets = {"val": heldout, "train": train}
        self.seed, self.device, self.dtype = seed, device, dtype
        self.latents = {name: self._latents(probe) for name, probe in self.sets.items()}

    def _latents(self, probe: ProbeSet) -> list[torch.Tensor]:
        if probe.cache is not None and all(
            probe.images.placements[i].crop is not None for i in probe.indices
        ):
            return [probe.cache.mean(i, False) for i in probe.indices]
        vae, out = self.base.vae, []
        home = next(vae.parameters()).device
        vae.to(self.device)
        with torch.no_grad():
            for i in probe.indices:
                pixels = probe.images.pixels(i, False, probe_crop(probe.images, i, self.seed))[
                    None
                ]  # (1, 3, H, W)
                pixels = pixels.to(self.device, self.base.vae_dtype or self.dtype)
                mean = vae.encode(pixels).latent_dist.mean[0].float().cpu()  # (C, h, w)
                out.append(
                    scale_latents(mean, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))
                )
        vae.to(home)
        return out

    def _examples(self, name: str, text_encoders) -> list[ProbeExample]:
        probe, family = self.sets[name], self.base.family
        images = probe.images
        captions = [images.decorated(i) for i in probe.indices]
        with torch.no_grad():
            text = family.encode_prompts(self.base.tokenizers, text_encoders, captions, self.device)
        geometry = [
            Geometry(p.original, p.crop_for(False, probe_crop(images, i, self.seed)), p.bucket)
            for i, p in ((i, images.placements[i]) for i in probe.indices)
        ]
        text = {k: v.float().cpu() for k, v in text.items()}
        inputs = split_inputs(family.denoiser_inputs(text, geometry, "cpu", torch.float32))
        return [ProbeExample(i, lat, inp) for i, lat, inp in zip(probe.indices, self.latents[name], inputs)]

    def evaluate(self, denoiser, text_encoders) -> dict[str, dict[int, float]]:
        """{"val": per-timestep held-out loss, "train": the same on the training sample}, with the text
        encoders borrowed onto the device and every trained module in eval mode."""
        homes = [next(e.parameters()).device for e in text_encoders]
        for encoder in text_encoders:
            encoder.to(self.device)
        try:
            with evaluating(text_encoders):
                return {
                    name: heldout_loss(
                        denoiser,
                        self._examples(name, text_encoders),
                        self.timesteps,
                        self.objective,
                        self.seed,
                        self.dtype,
                        self.device,
                        denoise=self.base.family.denoise,
                    )
                    for name in self.sets
                }
        finally:
            for encoder, home in zip(text_encoders, homes):
                encoder.to(home)
