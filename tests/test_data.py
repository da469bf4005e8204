"""Training data: pictures without torchvision, a batch plan that is a pure function of the seed, and
image folders read whole whatever their file names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.buckets import BucketSettings, place
from sdlora.data import BatchPlan, load_image_folder, picture, to_tensor
from sdlora.errors import UserError


def test_picture_resizes_to_cover_then_crops_the_bucket():
    image = Image.new("RGB", (200, 100))
    p = place(image.size, BucketSettings("center", 64), [])
    assert picture(image, p, p.crop).size == (64, 64)
    small = place((30, 40), BucketSettings("center", 64), [])
    assert picture(Image.new("RGB", (30, 40)), small, small.crop).size == (64, 64)  # upscaled


def test_center_crop_takes_the_middle():
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 255  # a white middle third
    image = Image.fromarray(array)
    p = place(image.size, BucketSettings("center", 64), [])
    assert np.asarray(picture(image, p, p.crop)).min() == 255


def test_to_tensor_range_and_flip():
    array = np.zeros((4, 4, 3), dtype=np.uint8)
    array[:, 0] = 255
    t = to_tensor(Image.fromarray(array), flip=False)
    assert t.shape == (3, 4, 4) and t.min() == -1 and t.max() == 1
    assert torch.equal(to_tensor(Image.fromarray(array), flip=True), t.flip(-1))


def plan(n=10, batch_size=2, accumulation=1, buckets=None):
    return BatchPlan(list(range(n)), buckets or [(64, 64)] * n, batch_size, accumulation, seed=1)


def test_batches_are_seeded_and_cover_the_data_once_per_epoch():
    one = plan().epoch(0, 0, 1)
    assert one == plan().epoch(0, 0, 1) and one != plan().epoch(1, 0, 1)
    assert sorted(i for b in one for i in b) == list(range(10))
    a, b = plan(7).epoch(0, 0, 2), plan(7).epoch(0, 1, 2)
    assert len(a) == len(b)  # every process gets as many batches: no process waits alone in a collective
    assert sorted(i for x in a + b for i in x) == list(range(7))  # and no image twice


def test_plan_respects_accumulation_epochs_and_total():
    p = plan(8, 2, 3)
    assert p.steps_per_epoch(1) == 2  # 4 micro-batches: a step of 3 and a step of 1
    steps = p.steps(rank=0, world=1, total_steps=5)
    assert [s.number for s in steps] == [1, 2, 3, 4, 5]
    assert [len(s.micro_batches) for s in steps] == [3, 1, 3, 1, 3]
    assert [s.epoch for s in steps] == [0, 0, 1, 1, 2]
    assert [s.last_of_epoch for s in steps[:4]] == [False, True, False, True]


def test_plan_of_held_back_examples_trains_only_on_the_rest():
    p = BatchPlan([0, 2, 5, 7], [(64, 64)] * 4, 2, 1, seed=0)
    assert sorted(i for b in p.epoch(0, 0, 1) for i in b) == [0, 2, 5, 7]


@pytest.mark.parametrize(
    "names",
    [
        ["COCO_val2014_000001.jpg", "COCO_val2014_000002.jpg"],  # imagefolder would make a 'validation' split
        ["train_0.jpg", "test_1.jpg", "photo.jpg"],  # would split and lose metadata.jsonl in 'test'
        ["val.jpg", "sub/train.jpg", "sub/other.png"],
    ],
)
def test_image_folder_is_one_training_split_whatever_the_file_names(tmp_path, names):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names)
    )
    dataset = load_image_folder(str(tmp_path))
    assert sorted(dataset["text"]) == sorted(names)


def test_image_folder_without_captions_is_refused_by_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="no metadata.jsonl"):
        load_image_folder(str(tmp_path))


def test_images_missing_from_metadata_jsonl_are_listed_and_refused_unless_skipped(tmp_path, capsys):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    rows = [{"file_name": n, "text": n} for n in ("a.png", "b.png", "c.png", "gone.png")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="2 images in .* cannot be used.*--skip_invalid"):
        load_image_folder(str(tmp_path))
    listed = capsys.readouterr().err
    assert "d.png: no line in" in listed and "gone.png: named in" in listed
    dataset = load_image_folder(str(tmp_path), skip_invalid=True)
    assert sorted(dataset["text"]) == ["a.png", "b.png", "c.png"]
