"""Training data: load the dataset, turn images into training pictures without torchvision, plan every batch.

Augmentation randomness (flips, random crops), caption choices and the batch order are pure functions
of (seed, epoch, example index), not of a random state that runs forward; so a resumed run sees exactly
the batches, pictures and captions an uninterrupted run would, in any number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import BucketSettings, Placement, epoch_batches, place_all
from .caption_controls import CaptionControls
from .errors import UserError
from .images import load_image


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
    # Keep the raw bytes: images are decoded by our own loader (EXIF, RGB, corrupt-file checks).
    return dataset.cast_column(source.image_column, datasets.Image(decode=False))


def load_image_folder(folder: str, skip_invalid: bool = False):
    """Every image under `folder` with a caption in its metadata.jsonl, as one train split.

    Read here rather than by datasets' imagefolder, which infers splits from file names (COCO_val2014_1.jpg
    went to 'validation', train_0.jpg to 'train' without its caption) and drops or keeps images metadata.jsonl
    does not name without a word: each image without a line (and each line without an image) is listed, and
    refused unless skip_invalid.
    """
    import datasets

    from .captions import metadata_rows
    from .images import IMAGE_EXTENSIONS, report_problems

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
    # Identified by the files' names, sizes and times too: an image edited in place is a new dataset, so
    # its cached latents are never served again.
    stats = [(r["image"], os.stat(r["image"]).st_size, os.stat(r["image"]).st_mtime_ns) for r in rows]
    identity = hashlib.sha256(json.dumps([rows, stats], sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(), new_fingerprint=identity)


def image_source(value) -> tuple[bytes | str, str]:
    """(bytes or path, name for messages) from an undecoded datasets Image value."""
    name = value.get("path") or "image"
    return (value["bytes"] if value.get("bytes") else value["path"]), name


def augmentation(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream for one example in one epoch: the flip, then a random crop's offsets."""
    return np.random.default_rng([seed, epoch, index])


RESAMPLE = {
    "lanczos": Image.LANCZOS,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
}


def picture(
    image: Image.Image, placement: Placement, crop: tuple[int, int], resample: str = "lanczos"
) -> Image.Image:
    """Resize to the placement's size (PIL's filters antialias when shrinking), then crop its bucket at
    `crop` (left, top)."""
    image = image.resize(placement.resized, RESAMPLE[resample])
    (left, top), (w, h) = crop, placement.bucket
    return image.crop((left, top, left + w, top + h))


def to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (3, H, W)
    return tensor / 127.5 - 1.0


@dataclass(frozen=True)
class Augment:
    """Per-example randomness settings."""

    seed: int
    random_flip: bool
    interpolation: str = "lanczos"
    background: tuple[int, int, int] = (255, 255, 255)


class TrainImages(torch.utils.data.Dataset):
    """Examples keyed by (epoch, index): the picture after augmentation, its caption, its flip."""

    def __init__(
        self, dataset, image_column: str, raw_captions: list, augment: Augment, captions: CaptionControls
    ):
        self.dataset, self.image_column = dataset, image_column
        self.raw_captions, self.augment, self.controls = raw_captions, augment, captions
        self.sizes: list[tuple[int, int]] = []  # upright (width, height) of each image, set by check_images
        self.placements: list[Placement] = []  # set by place()
        self.load_pixels = True

    def __len__(self) -> int:
        return len(self.dataset)

    def place(self, settings: BucketSettings) -> None:
        self.placements = place_all(self.sizes, settings)

    def flip(self, epoch: int, index: int) -> bool:
        return bool(self.augment.random_flip and augmentation(self.augment.seed, epoch, index).random() < 0.5)

    def crop(self, epoch: int, index: int) -> tuple[int, int]:
        """The crop corner (left, top) in the resized image: fixed, or drawn per epoch for random crops."""
        placement = self.placements[index]
        if placement.crop is not None:
            return placement.crop
        rng = augmentation(self.augment.seed, epoch, index)
        rng.random()  # the flip draw, so crop offsets are the same whether or not flips are on
        slack = (placement.resized[0] - placement.bucket[0], placement.resized[1] - placement.bucket[1])
        return int(rng.integers(0, slack[0] + 1)), int(rng.integers(0, slack[1] + 1))

    def caption(self, epoch: int, index: int) -> str:
        return self.controls.caption(self.raw_captions[index], self.augment.seed, epoch, index)

    def pixels(self, index: int, flip: bool, crop: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) in [-1, 1] at the image's bucket size."""
        source, name = image_source(self.dataset[index][self.image_column])
        image = load_image(source, name=name, background=self.augment.background).image
        return to_tensor(picture(image, self.placements[index], crop, self.augment.interpolation), flip)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        flip, crop = self.flip(epoch, index), self.crop(epoch, index)
        item = {"index": index, "flip": flip, "crop": crop, "caption": self.caption(epoch, index)}
        if self.load_pixels:
            item["pixel_values"] = self.pixels(index, flip, crop)
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "index": torch.tensor([i["index"] for i in items]),
        "flip": torch.tensor([i["flip"] for i in items]),
        "crop": [i["crop"] for i in items],
        "caption": [i["caption"] for i in items],
    }
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in items])  # (B, 3, H, W), one bucket
    return batch


@dataclass
class Step:
    """One optimizer step: its micro-batches (lists of (epoch, index) keys) and where it sits in the run."""

    number: int  # 1-based global step
    epoch: int
    micro_batches: list[list[tuple[int, int]]]
    last_of_epoch: bool


@dataclass(frozen=True)
class BatchPlan:
    """What decides the order of batches: the examples trained on (dataset indices) and their buckets."""

    indices: list[int]  # dataset indices of the training examples (held-out ones excluded)
    buckets: list[tuple[int, int]]  # bucket of each training example
    batch_size: int
    accumulation: int
    seed: int

    def epoch(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        """This process's batches (dataset indices) in `epoch`: every world-th batch of the epoch."""
        batches = epoch_batches(self.buckets, self.batch_size, self.seed, epoch, world)
        return [[self.indices[i] for i in b] for b in batches[rank::world]]

    def steps_per_epoch(self, world: int) -> int:
        return math.ceil(len(self.epoch(0, 0, world)) / self.accumulation)

    def steps(self, rank: int, world: int, total_steps: int) -> list[Step]:
        """Every optimizer step of the run, in order; a step never spans an epoch boundary."""
        steps: list[Step] = []
        epoch = 0
        while len(steps) < total_steps:
            batches = [[(epoch, i) for i in b] for b in self.epoch(epoch, rank, world)]
            groups = [batches[s : s + self.accumulation] for s in range(0, len(batches), self.accumulation)]
            for g, group in enumerate(groups):
                steps.append(Step(len(steps) + 1, epoch, group, g == len(groups) - 1))
                if len(steps) == total_steps:
                    break
            epoch += 1
        return steps


def check_images(
    images: TrainImages, resolution: int, upscales: bool = True
) -> tuple[list[str], list[str], list[int]]:
    """Decode every image once, before any step: all unusable files are named together (not one crash
    mid-run) and each usable image's size is recorded. Returns (warnings users need, problems, the unusable
    indices); the caller refuses or skips the unusable ones."""
    from .images import ImageReport, InvalidImageError

    problems, bad, report, small = [], [], ImageReport(), 0
    images.sizes = []
    for index in range(len(images)):
        source, name = image_source(images.dataset[index][images.image_column])
        try:
            loaded = load_image(source, name=name, background=images.augment.background)
        except InvalidImageError as e:
            problems.append(str(e))
            bad.append(index)
            continue
        report.add(loaded)
        images.sizes.append(loaded.image.size)
        small += min(loaded.image.size) < resolution
    warnings = []
    if small and upscales:
        warnings.append(
            f"{small} of {len(images)} images are smaller than {resolution} px and will be upscaled"
        )
    if report.counts:
        warnings.append(report.summary())
    return warnings, problems, bad


def check_captions(captions: list[str], tokenizer) -> list[str]:
    """Warnings about the captions as trained: empty ones, and ones the text encoder truncates."""
    warnings = []
    empty = sum(not c.strip() for c in captions)
    if empty:
        warnings.append(f"{empty} captions are empty; those images train as unconditional examples")
    limit = tokenizer.model_max_length
    long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
    if long:
        warnings.append(
            f"{len(long)} captions are longer than {limit} tokens; the text encoder sees only their first "
            f"{limit} tokens (start and end tokens included), e.g. {long[0][:80]!r}"
        )
    return warnings


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning rates, derived from the flags and the batch plan."""

    max_train_steps: int
    num_train_epochs: int
    learning_rate: float  # after --scale_lr
    unet_lr: float  # the denoiser's (default: learning_rate)
    text_encoder_lr: float  # (default: learning_rate)


def resolve_schedule(opt, plan: BatchPlan, world: int) -> Schedule:
    """Total steps and epochs with the diffusers example's epoch/step arithmetic (opt:
    config.train.OptimizationConfig); --scale_lr applied here, where the batch size is known."""
    per_epoch = plan.steps_per_epoch(world)
    steps = opt.max_train_steps if opt.max_train_steps is not None else opt.num_train_epochs * per_epoch
    scale = opt.gradient_accumulation_steps * opt.train_batch_size * world if opt.scale_lr else 1
    lr = opt.learning_rate * scale
    return Schedule(
        steps,
        math.ceil(steps / per_epoch),
        lr,
        opt.unet_lr * scale if opt.unet_lr is not None else lr,
        opt.text_encoder_lr * scale if opt.text_encoder_lr is not None else lr,
    )
