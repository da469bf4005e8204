"""Latent and text-embedding caches: encode each image and caption once, not on every step.

For SD 1.5 at 512 px the VAE encoder costs about 1.1 TFLOP per image, more than the UNet's forward
pass (0.8 TFLOP), so encoding once per image (and per flip) removes about 40% of a LoRA step's work.
A cache is keyed by everything its content depends on (data, encoder weights, every preprocessing
setting, the captions themselves), so a changed setting never reuses a stale cache.

Entries are per item (image or caption) and may differ in shape (aspect-ratio buckets). A small cache
lives in memory; a large one (or any with --cache_latents_to_disk) lives in safetensors shards on disk
that are read on demand, so the trainer's memory does not grow with the dataset. With several
processes each process encodes its own shards and all of them read the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError
from .faults import trace
from .fileio import atomic_file

logger = logging.getLogger(__name__)
# Items per shard file: 64 MB at 512 px with flips. (SDLORA_CACHE_SHARD_SIZE: tests use small shards to
# have several processes share a small dataset.)
SHARD_SIZE = int(os.environ.get("SDLORA_CACHE_SHARD_SIZE", "256"))
_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}


def module_fingerprint(module: torch.nn.Module) -> str:
    """An identity for a module's weights: its config and every byte of every tensor (name, dtype, shape).

    Every value, not a sample: a VAE fine-tuned and saved over the same folder differs in a few weights,
    and the ~64 values per tensor read before missed them and reused the old VAE's latents. Measured on
    one core of an AMD EPYC (SHA extensions): SD 1.5's VAE (83.7 M parameters) 0.23 s in fp32, 0.12 s
    in bf16, the tiny VAE 3 ms; sha256 because blake2b took twice as long there (0.50 s in fp32).
    """
    h = hashlib.sha256(json.dumps(getattr(module, "config", {}), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        # A zero-copy byte view of the tensor (a copy only when it is on an accelerator or not contiguous);
        # as uint8 in torch, since numpy has no bf16.
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        h.update(data.numpy())
    return h.hexdigest()[:16]


def cache_key(**parts) -> str:
    parts["shard_size"] = SHARD_SIZE  # the layout of the folder's files
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_hash(texts: list[str]) -> str:
    """An identity for a list of captions (order included)."""
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]


def latent_cache_key(
    dataset_fingerprint: str, vae: torch.nn.Module, settings: dict, dtype: torch.dtype
) -> str:
    """Everything the cached latents depend on: data, VAE weights and every preprocessing setting."""
    return cache_key(dataset=dataset_fingerprint, vae=module_fingerprint(vae), dtype=str(dtype), **settings)


def text_cache_key(captions: list[str], text_encoders, tokenizers, dtype: torch.dtype) -> str:
    """Everything the cached text embeddings depend on: the captions encoded, the encoders' weights,
    the tokenizers (vocabulary and maximum length) and the dtype."""
    return cache_key(
        captions=text_hash(captions),
        text_encoders=[module_fingerprint(e) for e in text_encoders],
        tokenizers=[
            (len(t), t.model_max_length, text_hash(sorted(t.get_vocab())[:5000])) for t in tokenizers
        ],
        dtype=str(dtype),
    )


class ShardReader:
    """Reads single tensors from a safetensors file with plain reads (no memory map), so a tensor read
    once does not stay in the process's resident memory."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        n = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        self.header = json.loads(os.pread(self.fd, n, 8))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        data = bytearray(os.pread(self.fd, end - begin, self.data_start + begin))
        return torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])

    def __del__(self):
        try:  # noqa: SIM105 - contextlib may already be gone when this runs at interpreter exit
            os.close(self.fd)
        except (AttributeError, OSError, TypeError):
            pass


class TensorStore:
    """A dict of tensors per item, in memory or in safetensors shards of SHARD_SIZE items in `folder`.

    A shard file appears complete or not at all (written under a temporary name, then renamed), and is
    written by exactly one process: shard k by process k % world. So several processes, a killed run
    and a later resume can all share one folder.
    """

    def __init__(self, n: int, names: list[str], folder: Path | None, in_memory: bool):
        self.n, self.names, self.folder, self.in_memory = n, names, folder, in_memory
        self.items: list[dict[str, torch.Tensor]] | None = None
        self.readers: dict[int, ShardReader] = {}

    def _shard(self, k: int) -> Path:
        return self.folder / f"shard-{k:05d}.safetensors"

    def fill(
        self, encode: Callable[[list[int]], list[dict[str, torch.Tensor]]], rank: int, world: int, barrier
    ) -> None:
        """Encode every missing item (this process's shards only), then make all items readable."""
        if self.folder is None:  # one process, memory only
            self.items = encode(list(range(self.n)))
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        shards = range((self.n + SHARD_SIZE - 1) // SHARD_SIZE)
        todo = [k for k in shards if k % world == rank and not self._shard(k).is_file()]
        if len(todo) < len(shards) and rank == 0:
            logger.info("reusing the cache in %s", self.folder)
        for k in todo:
            items = encode(list(range(k * SHARD_SIZE, min((k + 1) * SHARD_SIZE, self.n))))
            self._write(k, items)
            trace(rank, "encoded", cache=self.folder.name, shard=k)
        if todo:
            logger.info("cache written to %s", self.folder)
        barrier()
        if self.in_memory:
            self.items = [self._read(i) for i in range(self.n)]
            self.readers.clear()

    def _write(self, k: int, items: list[dict[str, torch.Tensor]]) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {
            f"{k * SHARD_SIZE + j}.{name}": t.contiguous()
            for j, item in enumerate(items)
            for name, t in item.items()
        }
        try:
            with atomic_file(self._shard(k)) as tmp:
                save_file(tensors, str(tmp))
        except (OSError, SafetensorError) as e:  # a full disk: atomic_file has removed the partial shard
            # (safetensors says "Error while serializing: I/O error: No space left on device (os error 28)")
            reason = getattr(e, "strerror", None) or str(e).rpartition("I/O error: ")[2]
            raise UserError(
                f"{self.folder}: cannot write the cache there ({reason}); free some space, pass another "
                "--latents_cache_dir, or drop --cache_latents_to_disk"
            ) from None

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        k = i // SHARD_SIZE
        if k not in self.readers:
            self.readers[k] = ShardReader(self._shard(k))
        return {name: self.readers[k].get(f"{i}.{name}") for name in self.names}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i] if self.items is not None else self._read(i)


def write_key(folder: Path | None, meta: dict) -> None:
    """A readable note of what a cache folder holds, beside its shards."""
    if folder is not None:
        with atomic_file(folder / "key.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2, default=str))


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

    def mean(self, index: int, flip: bool) -> torch.Tensor:
        """The scaled mean latent of one image: the deterministic latent held-out losses use."""
        mean = self._moments(index, flip).chunk(2, dim=0)[0]  # (C, h, w)
        return scale_latents(mean, self.scaling_factor, self.shift_factor)


def scale_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    return (latents - (shift_factor or 0.0)) * scaling_factor


class TextCache:
    """Text-encoder outputs for every caption training can use, while the text encoders are frozen."""

    def __init__(self, store: TensorStore, captions: list[str]):
        self.store = store
        self.row = {c: i for i, c in enumerate(captions)}

    def lookup(self, captions: list[str], device, dtype) -> dict[str, torch.Tensor]:
        rows = [self.store[self.row[c]] for c in captions]
        return {
            name: torch.stack([r[name] for r in rows]).to(device, dtype, non_blocking=True)
            for name in rows[0]
        }


def latent_bytes(images, vae, flips: int) -> int:
    """The latent cache's size: mean and log-variance (2C channels, fp32) per image and flip."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    per_pixel = 2 * vae.config.latent_channels * 4 * flips
    return sum(per_pixel * (p.bucket[0] // factor) * (p.bucket[1] // factor) for p in images.placements)


def encode_latents(
    images, vae, indices: list[int], flips: list[bool], device, dtype, batch_size: int
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
    return [entries[i] for i in indices]


def encode_texts(base, captions: list[str], device, batch_size: int) -> list[dict]:
    """Cache entries for captions: the family's text conditioning of each, as fp32 CPU tensors."""
    out = []
    with torch.no_grad():
        for s in range(0, len(captions), batch_size):
            encoded = base.encode_prompts(captions[s : s + batch_size], device)
            out += [
                {k: v[j].float().cpu() for k, v in encoded.items()}
                for j in range(len(captions[s : s + batch_size]))
            ]
    return out


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
        store = TensorStore(len(images), ["moments", "original_size", "crop", "bucket"], folder, not on_disk)
        store.fill(
            lambda idx: encode_latents(
                images, base.vae, idx, flips, device, vae_dtype, options.cache_batch_size
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
        captions = images.controls.possible_captions(images.raw_captions)
        key = text_cache_key(captions, base.text_encoders, base.tokenizers, dtype)
        folder = root / f"text-{key}" if options.cache_latents_to_disk or world > 1 else None
        store = TensorStore(len(captions), list(base.family.text_outputs), folder, True)
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
