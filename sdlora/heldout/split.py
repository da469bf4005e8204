"""The held-out split and the fixed probes it is scored with: which images, which timesteps, which noise.

Every random choice here is a pure function of (seed, purpose, ...), like training's streams: the split is
stream 3, the training probe sample stream 4, the probe noise stream 5 (per example and timestep), a random
crop's fixed probe crop stream 6. So a resumed run holds out the same images and scores them with the same
noise, and two evaluations of the same weights give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import UserError

SPLIT_STREAM, TRAIN_PROBE_STREAM, NOISE_STREAM, CROP_STREAM = 3, 4, 5, 6
MAX_TRAIN_PROBES = 16  # enough to show the train/held-out gap; each costs a forward per probe timestep


def split_examples(n: int, split: str, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both sorted: --validation_split as a fraction of n ("0.1",
    rounded half up, at least 1) or a count ("8"), chosen by a permutation of the seed's own stream."""
    held = _held_out_count(n, split)
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


def _held_out_count(n: int, split: str) -> int:
    text = str(split).strip()
    try:
        count = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction < 1.0:  # also false for nan
            raise UserError(
                f"--validation_split {split!r}: use a fraction between 0 and 1 (e.g. 0.1) or a positive count of images (e.g. 8)"
            ) from None
        count = max(1, math.floor(n * fraction + 0.5))
    else:
        if count < 1:
            raise UserError(
                f"--validation_split {split!r}: use a positive count of images (e.g. 8) or a fraction between 0 and 1 (e.g. 0.1)"
            )
    if count >= n:
        raise UserError(
            f"--validation_split {split!r} holds out {count} of {n} images and leaves none to train on; "
            "pass a smaller fraction or count, add images, or drop --validation_split"
        )
    return count


def train_probe_indices(train: Sequence[int], k: int, seed: int) -> list[int]:
    """A fixed sample of k training indices (at most len(train)), sorted: the training images whose
    fixed-noise loss is logged beside the held-out one. The caller picks k, usually
    min(len(held out), len(train), MAX_TRAIN_PROBES), so both losses average over as many images."""
    k = min(k, len(train))
    chosen = np.random.default_rng([seed, TRAIN_PROBE_STREAM]).choice(len(train), size=k, replace=False)
    return sorted(int(train[i]) for i in chosen)


def probe_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps evenly spaced over [0, num_train_timesteps), each at the centre of its interval
    (8 of 1000: 62, 187, ..., 937), so that the curve covers fine detail and global structure alike."""
    if not 1 <= count <= num_train_timesteps:
        raise UserError(f"--validation_loss_timesteps {count}: use a count from 1 to {num_train_timesteps}")
    return [((2 * i + 1) * num_train_timesteps) // (2 * count) for i in range(count)]


def probe_noise(seed: int, index: int, timestep: int, shape: Sequence[int]) -> torch.Tensor:
    """The fixed fp32 CPU noise of one example at one probe timestep, from a generator of its own: the
    global RNG and the training streams are never touched, and CPU and GPU runs score the same noise."""
    state = int(
        np.random.SeedSequence([seed, NOISE_STREAM, index, timestep]).generate_state(1, dtype=np.uint64)[0]
        >> 1
    )
    generator = torch.Generator(device="cpu").manual_seed(state)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def probe_crop(images, index: int, seed: int) -> tuple[int, int]:
    """The crop (left, top) an example is scored with: its placement's own, or for random crops one drawn
    once from its own stream, so the held-out loss does not change with the epoch."""
    placement = images.placements[index]
    if placement.crop is not None:
        return placement.crop
    rng = np.random.default_rng([seed, CROP_STREAM, index])
    slack = (placement.resized[0] - placement.bucket[0], placement.resized[1] - placement.bucket[1])
    return int(rng.integers(0, slack[0] + 1)), int(rng.integers(0, slack[1] + 1))
