"""Building the caches a run can use: where each is valid, in memory or on disk, filled by every process."""

from __future__ import annotations

import logging
from pathlib import Path

from .keys import latent_cache_key, text_cache_key
from .latents import LatentCache, encode_latents, latent_bytes
from .store import TensorStore, write_key
from .text import TextCache, encode_texts, text_bytes

logger = logging.getLogger(__name__)


def build_caches(
    options,
    root: Path,
    base,
    images,
    fingerprint: str,
    preprocessing: dict,
    blockers: tuple,
    accelerator,
    dtype,
) -> tuple[LatentCache | None, TextCache | None]:
    """Latent and text-embedding caches where they are valid (options: config.train.CacheConfig; root: the
    on-disk caches' folder; preprocessing: every setting the pictures depend on, `flip` among them; blockers:
    (why latents cannot be cached, why text cannot), None where they can). On disk with
    --cache_latents_to_disk or when the latents would take more than --cache_memory_limit_gb of memory.

    Each is filled by every process for its own shards (through the cache folder when there are several
    processes), after which the frozen encoders leave the accelerator until validation needs them.
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    latent_blocker, text_blocker = blockers
    latent_cache = text_cache = None
    if options.cache_latents is not False and latent_blocker:
        (logger.warning if options.cache_latents else logger.info)(
            "latents not cached: %s; the VAE encodes every step", latent_blocker
        )
    elif options.cache_latents is not False:
        flips = [False, True] if preprocessing["flip"] else [False]
        vae_dtype = base.vae_dtype or dtype
        key = latent_cache_key(fingerprint, base.vae, preprocessing, vae_dtype)
        size = latent_bytes(images, base.vae, len(flips))
        on_disk = options.cache_latents_to_disk or size > options.cache_memory_limit_gb * 1e9
        if on_disk and not options.cache_latents_to_disk:
            logger.info("latent cache of %.1f GB exceeds --cache_memory_limit_gb: kept on disk", size / 1e9)
        folder = root / f"latents-{key}" if on_disk or world > 1 else None
        fields = ["moments", "original_size", "crop", "bucket"] + (["mask"] if images.masked else [])
        store = TensorStore(len(images), fields, folder, not on_disk)
        store.fill(
            lambda idx: encode_latents(
                images, base.vae, idx, flips, device, vae_dtype, options.cache_batch_size, rank
            ),
            rank,
            world,
            accelerator.wait_for_everyone,
        )
        if rank == 0:
            write_key(folder, {"kind": "latents", "examples": len(images), **preprocessing})
        latent_cache = LatentCache(
            store, base.vae.config.scaling_factor, getattr(base.vae.config, "shift_factor", None)
        )
        base.vae.to("cpu")  # not needed on the accelerator again until validation
    if options.cache_text_embeddings and text_blocker:
        logger.info("text embeddings not cached: %s; the text encoder runs every step", text_blocker)
    elif options.cache_text_embeddings:
        captions = images.possible_captions()
        key = text_cache_key(captions, base.text_encoders, base.tokenizers, dtype)
        # SD 3.5's T5 states are large (2.7 MB a caption at 77 + 256 tokens of 4096 in bf16): a text cache over
        # --cache_memory_limit_gb lives on disk as a large latent cache does, read on demand.
        size = text_bytes(encode_texts(base, captions[:1], device, 1)[0]) * len(captions)
        on_disk = size > options.cache_memory_limit_gb * 1e9
        if on_disk:
            logger.info("text cache of %.1f GB exceeds --cache_memory_limit_gb: kept on disk", size / 1e9)
        to_disk = options.cache_latents_to_disk or on_disk or world > 1
        folder = root / f"text-{key}" if to_disk else None
        store = TensorStore(len(captions), list(base.family.text_outputs), folder, not on_disk)
        store.fill(
            lambda idx: encode_texts(base, [captions[i] for i in idx], device, options.cache_batch_size),
            rank,
            world,
            accelerator.wait_for_everyone,
        )
        if rank == 0:
            write_key(folder, {"kind": "text", "captions": len(captions)})
        text_cache = TextCache(store, captions)
        for encoder in base.text_encoders:
            encoder.to("cpu")  # back only for validation
    return latent_cache, text_cache
