"""Training data: preprocessing without torchvision, and a batch plan that is a pure function of the seed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from sdlora.data import augmentation, epoch_batches, plan_steps, resize_and_crop, steps_per_epoch, to_tensor


def test_resize_short_side_then_crop_square():
    image = Image.new("RGB", (200, 100))
    out = resize_and_crop(image, 64, center_crop=True, rng=augmentation(0, 0, 0))
    assert out.size == (64, 64)
    small = resize_and_crop(Image.new("RGB", (30, 40)), 64, center_crop=False, rng=augmentation(0, 0, 0))
    assert small.size == (64, 64)  # upscaled


def test_center_crop_takes_the_middle_and_random_crop_varies_by_epoch():
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 255  # a white middle third
    image = Image.fromarray(array)
    assert np.asarray(resize_and_crop(image, 64, True, augmentation(0, 0, 0))).min() == 255
    crops = {resize_and_crop(image, 64, False, augmentation(0, epoch, 3)).tobytes() for epoch in range(8)}
    assert len(crops) > 1


def test_to_tensor_range_and_flip():
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    array[:, 0] = 255
    t = to_tensor(Image.fromarray(array), flip=False)
    assert t.shape == (3, 4, 4) and t.min() == -1 and t.max() == 1
    assert torch.equal(to_tensor(Image.fromarray(array), flip=True), t.flip(-1))


def test_batches_are_seeded_even_across_processes_and_cover_the_data():
    one = epoch_batches(10, 2, seed=1, epoch=0, rank=0, world=1)
    assert one == epoch_batches(10, 2, seed=1, epoch=0, rank=0, world=1)
    assert one != epoch_batches(10, 2, seed=1, epoch=1, rank=0, world=1)
    assert sorted(i for b in one for i in b) == list(range(10))
    a, b = (epoch_batches(7, 2, seed=1, epoch=0, rank=r, world=2) for r in (0, 1))
    assert len(a) == len(b) and all(len(x) == 2 for x in a + b)  # padded by wrap-around, like even_batches
    assert set(i for x in a + b for i in x) == set(range(7))


def test_plan_respects_accumulation_epochs_and_total():
    args = SimpleNamespace(train_batch_size=2, gradient_accumulation_steps=3, seed=0)
    assert steps_per_epoch(8, 2, 1, 3) == 2  # 4 micro-batches: a step of 3 and a step of 1
    steps = plan_steps(8, args, rank=0, world=1, total_steps=5)
    assert [s.number for s in steps] == [1, 2, 3, 4, 5]
    assert [len(s.micro_batches) for s in steps] == [3, 1, 3, 1, 3]
    assert [s.epoch for s in steps] == [0, 0, 1, 1, 2] and [s.last_of_epoch for s in steps[:4]] == [
        False,
        True,
    ] * 2
