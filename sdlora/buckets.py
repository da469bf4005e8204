"""Aspect-ratio buckets: how each image becomes a training picture, and which images batch together.

Without buckets a non-square photo is cropped to a square and loses its top and bottom (or sides).
With them (kohya's scheme, the default here), every image goes to the resolution of about
`resolution`^2 pixels whose aspect ratio is nearest its own, is resized to cover it and center-cropped
by at most the rounding, and every batch is drawn from one bucket. The placement of an image is a pure
function of its size and the settings, so the latent cache can hold it and a resumed run agrees with it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .errors import UserError

CROP_MODES = ("bucket", "center", "random")


@dataclass(frozen=True)
class BucketSettings:
    """The settings that decide every image's training size (kohya's flag names)."""

    mode: str  # "bucket", "center" (square center crop) or "random" (square random crop)
    resolution: int
    step: int = 64  # --bucket_reso_steps: bucket sides are multiples of this
    min_reso: int = 256
    max_reso: int = 1024
    no_upscale: bool = False

    def __post_init__(self):
        if self.mode not in CROP_MODES:
            raise ValueError(f"crop mode {self.mode!r}: use one of {CROP_MODES}")


@dataclass(frozen=True)
class Placement:
    """Where one image lands: its upright size, the size it is resized to, the bucket it trains at and
    the top-left corner of the bucket-sized crop (None for random crops, drawn anew each epoch)."""

    original: tuple[int, int]  # (width, height) of the upright image
    resized: tuple[int, int]  # (width, height) after resizing, before the crop
    bucket: tuple[int, int]  # (width, height) the model sees
    crop: tuple[int, int] | None  # (left, top) in the resized image

    def crop_for(self, flip: bool, crop: tuple[int, int] | None = None) -> tuple[int, int]:
        """(left, top) of the crop as seen in the (possibly flipped) picture: SDXL's crop conditioning."""
        left, top = crop if crop is not None else self.crop
        if flip:  # mirroring moves the crop window to the other side
            left = self.resized[0] - left - self.bucket[0]
        return left, top


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket set: (width, height) pairs with at most resolution^2 pixels, sides multiples of
    `step` between min_reso and max_reso, in landscape and portrait, plus the largest square."""
    max_area = resolution * resolution
    side = max(step, int(math.sqrt(max_area)) // step * step)
    found = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            found.update({(width, height), (height, width)})
        width += step
    return sorted(found, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's, compared in log space so that a 1:2 and
    a 2:1 image are treated alike; ties go to the larger bucket."""
    target = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def _cover(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The smallest size with the image's aspect ratio that covers `box`."""
    w, h = size
    scale = max(box[0] / w, box[1] / h)
    return max(box[0], round(w * scale)), max(box[1], round(h * scale))


def place(size: tuple[int, int], settings: BucketSettings, buckets: list[tuple[int, int]]) -> Placement:
    """Where an image of `size` (width, height) trains under `settings`."""
    res, step = settings.resolution, settings.step
    if settings.mode in ("center", "random"):
        resized = _cover(size, (res, res))
        if settings.mode == "random":
            return Placement(size, resized, (res, res), None)
        return Placement(size, resized, (res, res), ((resized[0] - res) // 2, (resized[1] - res) // 2))
    if settings.no_upscale:
        # kohya's no_upscale: an image within resolution^2 keeps its size, one above is scaled down to that
        # area; the bucket is that size rounded down to the step, and never wider or taller than max_reso
        # (a side below min_reso stays: raising it would upscale).
        scale = min(1.0, math.sqrt(res * res / (size[0] * size[1])))
        top = settings.max_reso // step * step
        bucket = tuple(min(top, max(step, int(side * scale) // step * step)) for side in size)
        if scale == 1.0 and bucket[0] <= size[0] and bucket[1] <= size[1]:
            return Placement(size, size, bucket, ((size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2))
    else:
        bucket = nearest_bucket(size, buckets)
    resized = _cover(size, bucket)
    return Placement(size, resized, bucket, ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2))


def bucket_settings(
    mode: str,
    resolution: int,
    size_multiple: int,
    step: int | None = None,
    min_reso: int | None = None,
    max_reso: int | None = None,
    no_upscale: bool = False,
) -> BucketSettings:
    """The bucket settings of a run: kohya's defaults (step 64, sides from resolution / 2 to resolution x 2),
    never finer than the denoiser's own downsampling allows (16 px for the tiny model), every default a
    multiple of the step; explicit bounds that are not are refused, as kohya does."""
    step = step or size_multiple * max(1, min(64, resolution // 8) // size_multiple)
    for name, value in (("--min_bucket_reso", min_reso), ("--max_bucket_reso", max_reso)):
        if value is not None and value % step:
            raise UserError(
                f"{name} {value}: must be a multiple of the bucket step {step} (--bucket_reso_steps)"
            )
    low = min_reso or max(step, resolution // 2 // step * step)
    high = max_reso or max(step, resolution * 2 // step * step)
    if low > high:
        raise UserError(f"--min_bucket_reso {low} is above --max_bucket_reso {high}")
    return BucketSettings(mode, resolution, step, low, high, no_upscale)


def place_all(sizes: list[tuple[int, int]], settings: BucketSettings) -> list[Placement]:
    buckets = bucket_resolutions(settings.resolution, settings.min_reso, settings.max_reso, settings.step)
    return [place(size, settings, buckets) for size in sizes]


def aspect_error(placement: Placement) -> float:
    """How far the bucket's aspect ratio is from the image's (0 = same; 0.1 = 10%)."""
    (w, h), (bw, bh) = placement.original, placement.bucket
    return abs(math.log((bw / bh) / (w / h)))


def bucket_table(placements: list[Placement]) -> list[tuple[tuple[int, int], int, float]]:
    """(bucket, image count, mean aspect error) for every bucket in use, by size."""
    counts = Counter(p.bucket for p in placements)
    errors: dict[tuple[int, int], list[float]] = {}
    for p in placements:
        errors.setdefault(p.bucket, []).append(aspect_error(p))
    return [(b, counts[b], float(np.mean(errors[b]))) for b in sorted(counts)]


def kohya_bucket_info(placements: list[Placement]) -> dict:
    """The `ss_bucket_info` metadata kohya's trainer writes: buckets by index and their mean aspect error."""
    table = bucket_table(placements)
    return {
        "buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n, _) in enumerate(table)},
        "mean_img_ar_error": float(np.mean([aspect_error(p) for p in placements])) if placements else 0.0,
    }


def epoch_batches(
    buckets: list[tuple[int, int]], batch_size: int, seed: int, epoch: int, world: int
) -> list[list[int]]:
    """Every batch of one epoch, for all processes, in training order: each batch from one bucket,
    every image exactly once, the images within a bucket and the batch order shuffled from the seed.

    Processes take batches in turn, so the count is made a multiple of `world`: by halving the largest
    batch, else (all single images) by joining two of one bucket, so that no image repeats; only when
    neither can be done (more processes than images, say) are batches repeated.
    """
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches: list[list[int]] = []
    for k, bucket in enumerate(sorted(by_bucket)):
        members = np.asarray(by_bucket[bucket])
        members = members[np.random.default_rng([seed, epoch, 1, k]).permutation(len(members))].tolist()
        batches += [members[s : s + batch_size] for s in range(0, len(members), batch_size)]
    while len(batches) % world and any(len(b) > 1 for b in batches):  # one more batch: halve the largest
        i = max(range(len(batches)), key=lambda j: len(batches[j]))
        big = batches.pop(i)
        batches[i:i] = [big[: len(big) // 2], big[len(big) // 2 :]]
    while len(batches) % world and len(batches) > world and (pair := _same_bucket_pair(batches, buckets)):
        first, second = pair  # single images only now: one fewer batch, by joining two of one bucket
        batches[first] += batches.pop(second)
    if len(batches) % world:  # e.g. more processes than images: only repeating makes the count even
        batches += batches[: world - len(batches) % world]
    order = np.random.default_rng([seed, epoch, 2]).permutation(len(batches))
    return [batches[i] for i in order]


def _same_bucket_pair(batches: list[list[int]], buckets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first two single-image batches from the same bucket (by position), or None."""
    seen: dict[tuple[int, int], int] = {}
    for j, batch in enumerate(batches):
        if len(batch) != 1:
            continue
        if buckets[batch[0]] in seen:
            return seen[buckets[batch[0]]], j
        seen[buckets[batch[0]]] = j
    return None
