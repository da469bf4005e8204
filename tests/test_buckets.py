"""Aspect-ratio buckets: every shape lands near its own aspect ratio, and batches cover an epoch exactly once."""

from __future__ import annotations

import math

import pytest

from sdlora.buckets import (
    BucketSettings,
    Placement,
    aspect_error,
    bucket_resolutions,
    bucket_table,
    epoch_batches,
    kohya_bucket_info,
    place,
    place_all,
)

SD15 = BucketSettings("bucket", 512, 64, 256, 1024)


def test_bucket_set_matches_kohyas_for_sd15():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert (512, 768) not in buckets  # over the 512^2 area
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert all(256 <= w <= 1024 and 256 <= h <= 1024 for w, h in buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    # kohya's list for 512 / 256..1024 / 64: the square and 8 shapes each way.
    landscape = [
        (576, 448),
        (640, 384),
        (704, 320),
        (768, 320),
        (832, 256),
        (896, 256),
        (960, 256),
        (1024, 256),
    ]
    assert set(buckets) == {(512, 512), *landscape, *[(h, w) for w, h in landscape]}


@pytest.mark.parametrize("ratio", [1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1, 4 / 3, 3 / 2, 2, 3, 4])
def test_each_aspect_ratio_goes_to_the_nearest_bucket_and_covers_it(ratio):
    size = (round(1200 * math.sqrt(ratio)), round(1200 / math.sqrt(ratio)))
    buckets = bucket_resolutions(512, 256, 1024, 64)
    p = place(size, SD15, buckets)
    target = math.log(size[0] / size[1])
    best = min(abs(math.log(w / h) - target) for w, h in buckets)
    assert abs(math.log(p.bucket[0] / p.bucket[1]) - target) == pytest.approx(best)
    # Resized to cover the bucket, with the crop only taking off the rounding on one side.
    assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]
    assert min(p.resized[0] - p.bucket[0], p.resized[1] - p.bucket[1]) <= 1
    left, top = p.crop
    assert 0 <= left <= p.resized[0] - p.bucket[0] and 0 <= top <= p.resized[1] - p.bucket[1]
    assert (
        abs(left - (p.resized[0] - p.bucket[0]) / 2) <= 0.5
        and abs(top - (p.resized[1] - p.bucket[1]) / 2) <= 0.5
    )
    assert aspect_error(p) < 0.2


def test_tiny_and_huge_images_are_resized_into_buckets():
    buckets = bucket_resolutions(512, 256, 1024, 64)
    tiny = place((20, 30), SD15, buckets)
    huge = place((12000, 8000), SD15, buckets)
    assert tiny.bucket[0] * tiny.bucket[1] <= 512 * 512 and tiny.resized[0] >= tiny.bucket[0]
    assert huge.bucket == place((1200, 800), SD15, buckets).bucket


def test_no_upscale_keeps_small_images_at_their_own_size_rounded_down():
    settings = BucketSettings("bucket", 512, 64, 256, 1024, no_upscale=True)
    small = place((300, 200), settings, [])
    assert small.bucket == (256, 192) and small.resized == (300, 200)
    big = place((2000, 1000), settings, [])  # larger than 512^2: scaled down to that area first
    assert big.bucket[0] * big.bucket[1] <= 512 * 512 and big.bucket[0] % 64 == 0 and big.bucket[1] % 64 == 0
    assert big.resized[0] <= 2000 and abs(big.bucket[0] / big.bucket[1] - 2) < 0.3


def test_square_modes_and_flipped_crop_corner():
    center = place((200, 100), BucketSettings("center", 64), [])
    assert center == Placement((200, 100), (128, 64), (64, 64), (32, 0))
    assert center.crop_for(flip=True) == (128 - 32 - 64, 0)
    random = place((200, 100), BucketSettings("random", 64), [])
    assert random.crop is None and random.bucket == (64, 64)
    assert random.crop_for(False, (10, 0)) == (10, 0) and random.crop_for(True, (10, 0)) == (54, 0)


def buckets_of(sizes, settings=SD15):
    return [p.bucket for p in place_all(sizes, settings)]


MIXED = [(1200, 800)] * 7 + [(800, 1200)] * 5 + [(1000, 1000)] * 4 + [(2000, 500)] * 3


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_an_epoch_uses_every_image_once_in_single_bucket_batches(batch_size):
    buckets = buckets_of(MIXED)
    batches = epoch_batches(buckets, batch_size, seed=3, epoch=0, world=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(MIXED)))
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert all(len(b) <= batch_size for b in batches)
    assert batches == epoch_batches(buckets, batch_size, seed=3, epoch=0, world=1)
    assert batches != epoch_batches(buckets, batch_size, seed=3, epoch=1, world=1)


@pytest.mark.parametrize("world", [2, 3])
def test_processes_get_whole_batches_and_no_image_twice(world):
    buckets = buckets_of(MIXED)
    batches = epoch_batches(buckets, 4, seed=0, epoch=0, world=world)
    assert len(batches) % world == 0
    per_process = [batches[r::world] for r in range(world)]
    seen = [i for p in per_process for b in p for i in b]
    assert sorted(seen) == list(range(len(MIXED)))  # every image once across all processes
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)


def test_more_processes_than_images_repeat_batches_rather_than_hang():
    batches = epoch_batches([(64, 64)] * 3, 1, seed=0, epoch=0, world=4)
    assert len(batches) == 4 and sorted({i for b in batches for i in b}) == [0, 1, 2]


def test_bucket_table_and_kohya_metadata():
    placements = place_all(MIXED, SD15)
    table = bucket_table(placements)
    assert sum(n for _, n, _ in table) == len(MIXED)
    info = kohya_bucket_info(placements)
    assert sum(b["count"] for b in info["buckets"].values()) == len(MIXED)
    assert {tuple(b["resolution"]) for b in info["buckets"].values()} == {b for b, _, _ in table}
    assert 0 <= info["mean_img_ar_error"] < 0.2


@pytest.mark.parametrize(
    "resolution,multiple,expected",
    [
        (72, 16, (16, 32, 144)),
        (100, 32, (32, 32, 192)),
        (512, 64, (64, 256, 1024)),
        (1024, 32, (64, 512, 2048)),
    ],
)
def test_default_bucket_bounds_are_multiples_of_the_step(resolution, multiple, expected):
    from sdlora.buckets import bucket_settings

    settings = bucket_settings("bucket", resolution, multiple)
    assert (settings.step, settings.min_reso, settings.max_reso) == expected
    buckets = bucket_resolutions(resolution, settings.min_reso, settings.max_reso, settings.step)
    assert all(w % settings.step == 0 and h % settings.step == 0 for w, h in buckets)  # (72 px gave 68x64)


def test_explicit_bucket_bounds_off_the_step_are_refused_as_kohya_does():
    from sdlora.buckets import bucket_settings
    from sdlora.errors import UserError

    with pytest.raises(UserError, match="--min_bucket_reso 36: must be a multiple of the bucket step 16"):
        bucket_settings("bucket", 72, 16, min_reso=36)
    with pytest.raises(UserError, match="--max_bucket_reso 100: must be a multiple of the bucket step 64"):
        bucket_settings("bucket", 512, 64, step=64, max_reso=100)
    with pytest.raises(UserError, match="above --max_bucket_reso"):
        bucket_settings("bucket", 512, 64, min_reso=512, max_reso=256)


def test_no_upscale_keeps_buckets_within_the_largest_side():
    settings = BucketSettings("bucket", 512, 64, 256, 1024, no_upscale=True)
    thin = place((2000, 100), settings, [])  # within 512^2 pixels, but wider than 1024
    assert thin.bucket == (1024, 64) and thin.resized == (2000, 100)  # cropped, never enlarged
    tall = place((300, 4000), settings, [])  # above 512^2: scaled down first, then held to 1024 tall
    assert tall.bucket[1] == 1024 and tall.resized[1] >= 1024 and tall.resized[0] >= tall.bucket[0]


def test_an_odd_count_of_single_image_batches_never_repeats_an_image_across_processes():
    for images, world in ((3, 2), (5, 3), (7, 2)):
        batches = epoch_batches([(0, 0)] * images, 1, seed=0, epoch=0, world=world)
        flat = [i for b in batches for i in b]
        assert len(batches) % world == 0 and sorted(flat) == list(range(images)), (images, world, batches)
