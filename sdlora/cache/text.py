"""The text cache: the frozen text encoders' outputs for every caption training can use."""

from __future__ import annotations

import torch

from .store import TensorStore


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


def text_bytes(entry: dict[str, torch.Tensor]) -> int:
    """The size of one caption's cache entry."""
    return sum(t.numel() * t.element_size() for t in entry.values())


def encode_texts(base, captions: list[str], device, batch_size: int) -> list[dict]:
    """Cache entries for captions: the family's text conditioning of each, as CPU tensors in the encoders'
    dtype (bf16 halves SD 3.5's T5 states; lookups cast to the run's dtype, as the encoders' own output)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(captions), batch_size):
            encoded = base.encode_prompts(captions[s : s + batch_size], device)
            out += [
                {k: v[j].to("cpu", copy=True) for k, v in encoded.items()}  # (own storage: shards save apart)
                for j in range(len(captions[s : s + batch_size]))
            ]
    return out
