"""Caption controls at training time (kohya's flag names): trigger words, caption dropout, tag shuffling.

Every choice is a pure function of (seed, epoch, example index), like the augmentation stream, so a
resumed run trains on exactly the captions an uninterrupted run would. A dataset whose caption column
holds lists (common on the Hub) gets one of them per example and epoch, as the diffusers example does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

_STREAM = 2  # the caption stream; the augmentation stream (flip, random crop) has no suffix


@dataclass(frozen=True)
class CaptionControls:
    prefix: str = ""  # --caption_prefix, e.g. a trigger word on every caption
    suffix: str = ""  # --caption_suffix
    dropout_rate: float = 0.0  # --caption_dropout_rate: fraction trained with an empty caption
    shuffle: bool = False  # --shuffle_caption: shuffle the tags of each caption
    keep_tokens: int = 0  # --keep_tokens: the first N tags stay in place
    separator: str = ","  # --caption_separator
    tag_dropout_rate: float = 0.0  # --caption_tag_dropout_rate: drop each (unkept) tag with this chance

    @property
    def varies_per_epoch(self) -> bool:
        """True if the same example's caption text changes between epochs in ways a cache cannot hold."""
        return self.shuffle or self.tag_dropout_rate > 0

    def _tags(self, text: str) -> list[str]:
        return [t.strip() for t in text.split(self.separator) if t.strip()]

    def _join(self, tags: list[str]) -> str:
        return (self.separator + " ").join(tags) if self.separator.strip() else self.separator.join(tags)

    def decorate(self, text: str) -> str:
        """The caption with the trigger words around it (no random choice)."""
        parts = [p for p in (self.prefix.strip(), text.strip(), self.suffix.strip()) if p]
        return " ".join(parts)

    def caption(self, raw, seed: int, epoch: int, index: int, copy: int = 0) -> str:
        """The caption example `index` trains with in `epoch` (its `copy`-th repeat in the epoch)."""
        rng = np.random.default_rng(
            [seed, epoch, index, _STREAM, copy] if copy else [seed, epoch, index, _STREAM]
        )
        text = pick(raw, rng)
        if self.dropout_rate and rng.random() < self.dropout_rate:
            return ""  # unconditional: keeps classifier-free guidance working
        if self.varies_per_epoch:
            tags = self._tags(text)
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            if self.tag_dropout_rate:
                rest = [t for t in rest if rng.random() >= self.tag_dropout_rate]
            if self.shuffle:
                rest = [rest[i] for i in rng.permutation(len(rest))]
            text = self._join(kept + rest)
        return self.decorate(text)

    def possible_captions(self, raw_captions: list) -> list[str]:
        """Every caption text training can use when captions do not vary per epoch: what the text
        cache must hold (each list entry decorated, plus the empty caption with dropout)."""
        found = {self.decorate(str(c)) for raw in raw_captions for c in options(raw)}
        if self.dropout_rate:
            found.add("")
        return sorted(found)

    def tag_frequency(self, raw_captions: list) -> dict[str, int]:
        """How often each tag occurs in the captions as trained (kohya's ss_tag_frequency counts)."""
        counts: Counter = Counter()
        for raw in raw_captions:
            for text in options(raw):
                counts.update(self._tags(self.prefix) + self._tags(str(text)) + self._tags(self.suffix))
        return dict(counts.most_common())


def options(raw) -> list:
    """The caption choices of one example: a list column's entries, or the one caption."""
    if isinstance(raw, (list, tuple)):
        return [c for c in raw if c is not None] or [""]
    return ["" if raw is None else raw]


def pick(raw, rng: np.random.Generator) -> str:
    """One caption of an example; a list is sampled from the caption stream (always drawn, so the
    stream's later draws do not depend on whether the column holds lists)."""
    choices = options(raw)
    return str(choices[int(rng.integers(len(choices)))])
