"""create_dataset.py: round trips every image and caption; bad input fails clearly and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from sdlora.captions import write_metadata_jsonl

REPO = Path(__file__).resolve().parent.parent


def run_create(cwd: Path, *args: str, tiny_model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "create_dataset.py"),
            "--pretrained_model_name_or_path",
            str(tiny_model),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_round_trip(dataset_dir: Path, images_dir: Path, captions: dict[str, str]) -> None:
    ds = datasets.load_from_disk(str(dataset_dir))
    assert ds.column_names == ["image", "text"]
    assert sorted(ds["text"]) == sorted(captions.values())
    by_caption = {row["text"]: row["image"] for row in ds}
    for name, caption in captions.items():
        original = np.asarray(Image.open(images_dir / name).convert("RGB"))
        assert np.array_equal(np.asarray(by_caption[caption]), original), name


def test_sample_data_round_trips(sample_data, tiny_model):
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert "8 images" in result.stdout
    captions = {
        Path(k).name: v for k, v in json.loads((sample_data / "image_captions.json").read_text()).items()
    }
    assert_round_trip(sample_data / "datasets" / "Text2Image_example", sample_data / "images", captions)


def test_absolute_paths_from_the_original_toolkit(sample_data, tiny_model):
    relative = json.loads((sample_data / "image_captions.json").read_text())
    absolute = {str((sample_data / k).resolve()): v for k, v in relative.items()}
    (sample_data / "abs.json").write_text(json.dumps(absolute))
    result = run_create(sample_data, "--captions_file", "abs.json", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert len(datasets.load_from_disk(str(sample_data / "datasets" / "Text2Image_example"))) == 8


def test_metadata_jsonl_and_txt_sources(sample_data, tiny_model):
    captions = {
        Path(k).name: v for k, v in json.loads((sample_data / "image_captions.json").read_text()).items()
    }
    images = sample_data / "images"
    write_metadata_jsonl(images / "metadata.jsonl", {images / k: v for k, v in captions.items()})
    result = run_create(
        sample_data,
        "--captions_file",
        str(images / "metadata.jsonl"),
        "--dataset_name",
        "jsonl",
        tiny_model=tiny_model,
    )
    assert result.returncode == 0, result.stderr
    assert_round_trip(sample_data / "datasets" / "jsonl", images, captions)
    (images / "metadata.jsonl").unlink()
    for name, caption in captions.items():
        (images / name).with_suffix(".txt").write_text(caption + "\n")
    result = run_create(
        sample_data, "--captions_file", "missing.json", "--dataset_name", "txt", tiny_model=tiny_model
    )
    assert result.returncode == 0, result.stderr
    assert ".txt files" in result.stdout
    assert_round_trip(sample_data / "datasets" / "txt", images, captions)


def test_existing_dataset_is_kept_without_overwrite(sample_data, tiny_model):
    assert run_create(sample_data, tiny_model=tiny_model).returncode == 0
    marker = sample_data / "datasets" / "Text2Image_example" / "state.json"
    before = marker.read_bytes()
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert marker.read_bytes() == before
    assert run_create(sample_data, "--overwrite", tiny_model=tiny_model).returncode == 0


def _break(kind: str, root: Path) -> str:
    """Make one kind of bad input in a sample-data folder; return a word the error must contain."""
    captions_file = root / "image_captions.json"
    captions = json.loads(captions_file.read_text())
    if kind == "missing_image":
        (root / "images" / "red_circle.png").unlink()
        return "does not exist"
    if kind == "unreadable":
        (root / "images" / "red_circle.png").write_bytes(b"not a png")
        return "not an image"
    if kind == "image_without_caption":
        Image.new("RGB", (70, 70)).save(root / "images" / "extra.png")
        return "no caption"
    if kind == "caption_without_image":
        captions["images/ghost.png"] = "a ghost"
    if kind == "empty_caption":
        captions["images/red_circle.png"] = "   "
    if kind == "outside_folder":
        Image.new("RGB", (70, 70)).save(root / "outside.png")
        captions["outside.png"] = "outside"
    if kind == "malformed_json":
        captions_file.write_text('{"images/red_circle.png": "a red circle",\n')
        return "invalid JSON at line"
    captions_file.write_text(json.dumps(captions))
    return {
        "caption_without_image": "does not exist",
        "empty_caption": "empty caption",
        "outside_folder": "outside",
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "missing_image",
        "unreadable",
        "image_without_caption",
        "caption_without_image",
        "empty_caption",
        "outside_folder",
        "malformed_json",
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(sample_data, tiny_model, kind):
    words = _break(kind, sample_data)
    before = (sample_data / "image_captions.json").read_bytes()
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sample_data / "datasets").exists() or not any((sample_data / "datasets").iterdir())
    assert (sample_data / "image_captions.json").read_bytes() == before


def test_skip_invalid_builds_from_the_rest(sample_data, tiny_model):
    (sample_data / "images" / "red_circle.png").write_bytes(b"")
    Image.new("RGB", (70, 70)).save(sample_data / "images" / "extra.png")
    result = run_create(sample_data, "--skip_invalid", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert "empty file" in result.stderr and "no caption" in result.stderr  # both listed, not just the first
    assert len(datasets.load_from_disk(str(sample_data / "datasets" / "Text2Image_example"))) == 7


def test_image_corpus_through_the_builder(tmp_path, tiny_model):
    """Odd but valid files build, with conversions counted; every invalid file is listed at once."""
    from image_corpus import invalid, odd_but_valid

    images = tmp_path / "images"
    odd = odd_but_valid(images)
    long_caption = " ".join(["a red circle on a blue background"] * 20)
    captions = {f"images/{name}": ("一只猫 " if name == "gray.png" else "") + name for name in odd}
    captions["images/cmyk.jpg"] = long_caption
    (tmp_path / "image_captions.json").write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    result = run_create(tmp_path, "--resolution", "128", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert f"{len(odd)} images" in result.stdout
    assert "smaller than 128" in result.stdout and "longer than 77 tokens" in result.stdout
    assert (
        "transparency" in result.stdout and "animated" in result.stdout and "rotated upright" in result.stdout
    )
    ds = datasets.load_from_disk(str(tmp_path / "datasets" / "Text2Image_example"))
    assert "一只猫 gray.png" in ds["text"]  # non-ASCII captions pass through intact
    assert all(row["image"].mode == "RGB" for row in ds)
    rotated = next(row["image"] for row in ds if row["text"] == "exif_rotated.jpg")
    assert rotated.size == (64, 80)  # stored upright

    bad = invalid(images)
    for name in bad:
        captions[f"images/{name}"] = name
    (tmp_path / "image_captions.json").write_text(json.dumps(captions), encoding="utf-8")
    result = run_create(tmp_path, "--dataset_name", "with_bad", tiny_model=tiny_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for name in bad:
        assert name in result.stderr
    assert not (tmp_path / "datasets" / "with_bad").exists()
