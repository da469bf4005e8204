"""Latents and denoiser conditioning for a batch: from the caches, or from the frozen encoders every step."""

from __future__ import annotations

import torch

from ..cache import scale_latents
from ..data.masks import latent_mask
from ..families import Geometry


class Conditioning:
    """Latents and conditioning for a batch: looked up in the caches, or computed by the frozen encoders on
    every step (the plain path the diffusers example takes)."""

    def __init__(self, base, images, latent_cache, text_cache, text_encoders, device, dtype):
        self.base, self.images = base, images
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.text_encoders = text_encoders  # as prepared by accelerate when they are trained
        self.device, self.dtype = device, dtype

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """fp32 scaled latents (B, 4, H/8, W/8)."""
        if self.latent_cache is not None:
            return self.latent_cache.sample(batch["index"], batch["flip"], generator, self.device)
        vae = self.base.vae
        pixels = batch["pixel_values"].to(self.device, self.base.vae_dtype or self.dtype, non_blocking=True)
        with torch.no_grad():
            sample = vae.encode(pixels).latent_dist.sample(generator)  # (B, 4, H/8, W/8)
        return scale_latents(
            sample, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
        ).float()

    def masks(self, batch: dict, size: tuple[int, int]) -> torch.Tensor | None:
        """The batch's masks at the latents' `size` (B, 1, h, w), or None in a run without --masked_loss:
        cached with the latents, else the pictures' own averaged down (data.masks.latent_mask)."""
        if self.latent_cache is not None:
            return self.latent_cache.masks(batch["index"], batch["flip"], self.device)
        if "mask" not in batch:
            return None
        return latent_mask(batch["mask"].to(self.device, non_blocking=True), tuple(size))

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return self.text_cache.lookup(captions, self.device, self.dtype)
        trained = any(p.requires_grad for e in self.text_encoders for p in e.parameters())
        with torch.enable_grad() if trained else torch.no_grad():
            return self.base.family.encode_prompts(
                self.base.tokenizers, self.text_encoders, captions, self.device
            )

    def geometry(self, batch: dict) -> list[Geometry]:
        """Each example's size, crop (as seen after its flip) and bucket, from its recorded placement."""
        out = []
        for index, flip, crop in zip(batch["index"].tolist(), batch["flip"].tolist(), batch["crop"]):
            placement = self.images.placements[index]
            out.append(Geometry(placement.original, placement.crop_for(flip, crop), placement.bucket))
        return out

    def denoiser_inputs(self, batch: dict) -> dict:
        text = self.text(batch["caption"])
        return self.base.family.denoiser_inputs(text, self.geometry(batch), self.device, self.dtype)
