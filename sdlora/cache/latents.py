"""The latent cache: each image's VAE latent distribution at its bucket size (and flipped), sampled as the
VAE path would sample it."""

from __future__ import annotations

import torch

from ..data.masks import latent_mask
from ..faults import trace
from .store import TensorStore


class LatentCache:
    """VAE latent distributions (mean and log-variance) of every image at its bucket size, unflipped and
    flipped, with the image's original size, crop corner and bucket."""

    def __init__(self, store: TensorStore, scaling_factor: float, shift_factor: float | None):
        self.store, self.scaling_factor, self.shift_factor = store, scaling_factor, shift_factor

    def sample(
        self, index: torch.Tensor, flip: torch.Tensor, generator: torch.Generator, device
    ) -> torch.Tensor:
        """Scaled latents for a batch (one bucket, so one shape), sampled from the cached distributions as
        the VAE path would."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        params = torch.stack([self._moments(i, f) for i, f in zip(index.tolist(), flip.tolist())]).to(
            device, non_blocking=True
        )  # (B, 2C, h, w)
        return scale_latents(
            DiagonalGaussianDistribution(params).sample(generator), self.scaling_factor, self.shift_factor
        )

    def _moments(self, index: int, flip: bool) -> torch.Tensor:
        """(2C, h, w) of one image and flip, read once (a disk store reads it from its shard)."""
        moments = self.store[index]["moments"]  # (F, 2C, h, w)
        return moments[int(flip) if moments.shape[0] == 2 else 0]

    def masks(self, index: torch.Tensor, flip: torch.Tensor, device) -> torch.Tensor | None:
        """The batch's latent-size masks (B, 1, h, w), or None when the cache holds none."""
        if "mask" not in self.store.names:
            return None
        picked = []
        for i, f in zip(index.tolist(), flip.tolist()):
            mask = self.store[i]["mask"]  # (F, 1, h, w)
            picked.append(mask[int(f) if mask.shape[0] == 2 else 0])
        return torch.stack(picked).to(device, non_blocking=True)

    def mean(self, index: int, flip: bool) -> torch.Tensor:
        """The scaled mean latent of one image: the deterministic latent held-out losses use."""
        mean = self._moments(index, flip).chunk(2, dim=0)[0]  # (C, h, w)
        return scale_latents(mean, self.scaling_factor, self.shift_factor)


def scale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    return (latents - (shift_factor or 0.0)) * scaling_factor


def latent_bytes(images, vae, flips: int) -> int:
    """The latent cache's size: mean and log-variance (2C channels, fp32) per image and flip."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    per_pixel = 2 * vae.config.latent_channels * 4 * flips
    return sum(per_pixel * (p.bucket[0] // factor) * (p.bucket[1] // factor) for p in images.placements)


def encode_latents(
    images, vae, indices: list[int], flips: list[bool], device, dtype, batch_size: int, rank: int = 0
) -> list[dict]:
    """Cache entries for `indices`: latent moments per flip, plus each image's size, crop and bucket.
    Images are encoded in batches of one bucket each (one shape per batch)."""
    entries: dict[int, dict] = {}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        by_bucket.setdefault(images.placements[i].bucket, []).append(i)
    with torch.no_grad():
        for members in by_bucket.values():
            for s in range(0, len(members), batch_size):
                chunk = members[s : s + batch_size]
                trace(rank, "vae-batch", size=len(chunk))
                per_flip = []
                # Each image decoded once; its flipped picture is the same tensor mirrored (data.to_tensor).
                pixels = torch.stack([images.pixels(i, False, images.placements[i].crop) for i in chunk])
                for flip in flips:
                    flipped = pixels.flip(-1) if flip else pixels  # (B, 3, H, W)
                    moments = vae.encode(flipped.to(device, dtype)).latent_dist.parameters  # (B, 2C, h, w)
                    per_flip.append(moments.float().cpu())
                for j, i in enumerate(chunk):
                    p = images.placements[i]
                    entries[i] = {
                        "moments": torch.stack([m[j] for m in per_flip]),  # (F, 2C, h, w)
                        "original_size": torch.tensor(p.original),
                        "crop": torch.tensor(p.crop),
                        "bucket": torch.tensor(p.bucket),
                    }
                    if images.masked:  # the mask through the same flips, at the latents' size
                        size = tuple(per_flip[0].shape[-2:])
                        entries[i]["mask"] = torch.stack(
                            [latent_mask(images.mask(i, f, p.crop)[None], size)[0] for f in flips]
                        )  # (F, 1, h, w)
    return [entries[i] for i in indices]
