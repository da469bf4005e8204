"""Per-item tensors in memory or in safetensors shards on disk, written by each process for its own shards
and read on demand, so several processes, a killed run and a later resume can share one folder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..faults import trace
from ..fileio import atomic_file

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
