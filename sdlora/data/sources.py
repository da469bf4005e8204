"""Where training images and captions come from: a dataset saved by create_dataset.py, an imagefolder with
metadata.jsonl, or a Hub dataset."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class DatasetSource:
    """Where a set of images and captions comes from: a dataset saved by create_dataset.py, an imagefolder
    with metadata.jsonl, or a Hub dataset; which columns hold them; how many to use."""

    disk_path: str | None = None
    image_folder: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    cache_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    max_samples: int | None = None
    skip_invalid: bool = False  # images without a caption are listed and left out instead of refused
    # An image folder without metadata.jsonl: each image's caption from a .txt file beside it (kohya's
    # layout; several lines: several captions), else this one (kohya's class tokens, a class prompt).
    fallback_caption: str | None = None

    @classmethod
    def training(cls, data) -> DatasetSource:
        """The training set named by the data section of the configuration (config.train.DataConfig)."""
        return cls(
            data.dataset_disk_path if data.dataset_from_disk else None,
            data.train_data_dir,
            data.dataset_name,
            data.dataset_config_name,
            data.cache_dir,
            data.image_column,
            data.caption_column,
            data.max_train_samples,
            data.skip_invalid,
        )

    @classmethod
    def separate_heldout(cls, heldout, data) -> DatasetSource | None:
        """A separate held-out set (--validation_data_dir or --validation_dataset_disk_path), or None."""
        if not (heldout.validation_data_dir or heldout.validation_dataset_disk_path):
            return None
        return cls(
            heldout.validation_dataset_disk_path,
            heldout.validation_data_dir,
            cache_dir=data.cache_dir,
            image_column=data.image_column,
            caption_column=data.caption_column,
            skip_invalid=data.skip_invalid,
        )


def load_train_dataset(source: DatasetSource):
    """The dataset from disk (create_dataset.py's output), an imagefolder, or the Hub."""
    import datasets

    if source.disk_path:
        path = Path(source.disk_path)
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise UserError(
                f"{path}: no dataset saved there; run create_dataset.py or fix --dataset_disk_path"
            )
        dataset = datasets.load_from_disk(str(path))
    elif source.image_folder and not (Path(source.image_folder) / "metadata.jsonl").is_file():
        dataset = load_caption_folder(source.image_folder, source.fallback_caption, source.skip_invalid)
    elif source.image_folder:
        dataset = load_image_folder(source.image_folder, source.skip_invalid)
    else:
        try:
            dataset = datasets.load_dataset(source.hub_name, source.hub_config, cache_dir=source.cache_dir)
        except Exception as e:  # offline, unknown name, private: the user's remedy is the same
            raise UserError(f"{source.hub_name}: cannot load the dataset ({type(e).__name__}: {e})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise UserError(f"dataset has splits {list(dataset)} but no 'train' split")
        dataset = dataset["train"]
    for column, flag in (
        (source.image_column, "--image_column"),
        (source.caption_column, "--caption_column"),
    ):
        if column not in dataset.column_names:
            raise UserError(f"dataset has no column {column!r} (it has {dataset.column_names}); set {flag}")
    if source.max_samples is not None:
        dataset = dataset.select(range(min(source.max_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError("the training dataset is empty")
    # Keep the raw bytes: images (and masks) are decoded by our own loader (EXIF, RGB, corrupt-file checks).
    for name, feature in dataset.features.items():
        if name == source.image_column or isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def load_image_folder(folder: str, skip_invalid: bool = False):
    """Every image under `folder` with a caption in its metadata.jsonl, as one train split.

    Read here rather than by datasets' imagefolder, which infers splits from file names (COCO_val2014_1.jpg
    went to 'validation', train_0.jpg to 'train' without its caption) and drops or keeps images metadata.jsonl
    does not name without a word: each image without a line (and each line without an image) is listed, and
    refused unless skip_invalid.
    """

    from ..captions import metadata_rows
    from ..images import IMAGE_EXTENSIONS, report_problems

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: not a folder; pass an imagefolder with metadata.jsonl")
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise UserError(
            f"{folder}: no metadata.jsonl with captions; write one, or build a dataset with create_dataset.py"
        )
    images = {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    }
    lines = [row for _, row in metadata_rows(metadata)]
    named = {Path(row["file_name"]).as_posix() for row in lines}
    problems = [
        f"{images[n]}: no line in {metadata}; add one with its caption" for n in images if n not in named
    ]
    problems += [
        f"{root / n}: named in {metadata} but not in the folder" for n in sorted(named - set(images))
    ]
    report_problems(
        problems,
        f"images in {folder} cannot be used (listed above); fix metadata.jsonl, or pass --skip_invalid "
        "to train on the rest",
        fatal=not skip_invalid,
    )
    rows = [
        {"image": str(images[name]), **{k: v for k, v in row.items() if k != "file_name"}}
        for row in lines
        if (name := Path(row["file_name"]).as_posix()) in images
    ]
    if not rows:
        raise UserError(f"{folder}: no image in it has a caption in metadata.jsonl")
    return _dataset_of(rows)


def _dataset_of(rows: list[dict]):
    """A dataset of image paths and captions, identified by the files' names, sizes and times too: an image
    edited in place is a new dataset, so its cached latents are never served again."""
    import datasets

    stats = [(r["image"], os.stat(r["image"]).st_size, os.stat(r["image"]).st_mtime_ns) for r in rows]
    identity = hashlib.sha256(json.dumps([rows, stats], sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(), new_fingerprint=identity)


def load_caption_folder(folder: str, fallback: str | None, skip_invalid: bool = False):
    """Every image under `folder`, captioned by the .txt file of its name beside it (several lines: several
    captions, one drawn per example and epoch), else `fallback` (kohya's folders: the class tokens)."""
    from ..captions import clean_caption
    from ..images import find_images, report_problems

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: not a folder; pass a folder of images")
    rows, problems = [], []
    for image in find_images(root):
        text = image.with_suffix(".txt")
        lines = (
            [clean_caption(t) for t in text.read_text(encoding="utf-8").splitlines() if t.strip()]
            if text.is_file()
            else []
        )
        if not lines and fallback is None:
            problems.append(f"{image}: no caption ({text.name} beside it, or metadata.jsonl in the folder)")
            continue
        rows.append(
            {"image": str(image), "text": lines if len(lines) > 1 else (lines[0] if lines else fallback)}
        )
    report_problems(
        problems,
        f"images in {folder} have no caption (listed above); add them, or pass --skip_invalid",
        fatal=not skip_invalid,
    )
    if not rows:
        raise UserError(f"{folder}: no images in it; add some, or fix the path")
    if any(isinstance(r["text"], list) for r in rows):  # one type for the column: lists
        rows = [{**r, "text": r["text"] if isinstance(r["text"], list) else [r["text"]]} for r in rows]
    return _dataset_of(rows)
