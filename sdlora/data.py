"""Training data: load the dataset, turn images into training pictures without torchvision, plan every batch.

Augmentation randomness (flips, random crops), caption choices and the batch order are pure functions
of (seed, epoch, example index), not of a random state that runs forward; so a resumed run sees exactly
the batches, pictures and captions an uninterrupted run would, in any number of worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import BucketSettings, Placement, epoch_batches, place_all
from .caption_controls import CaptionControls
from .errors import UserError
from .images import load_image


def load_train_dataset(args):
    """The training dataset from disk (create_dataset.py's output), an imagefolder, or the Hub."""
    import datasets

    if args.dataset_from_disk:
        path = Path(args.dataset_disk_path)
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise UserError(
                f"{path}: no dataset saved there; run create_dataset.py or fix --dataset_disk_path"
            )
        dataset = datasets.load_from_disk(str(path))
    elif args.train_data_dir:
        dataset = load_image_folder(args.train_data_dir, args.cache_dir)
    else:
        try:
            dataset = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir
            )
        except Exception as e:  # offline, unknown name, private: the user's remedy is the same
            raise UserError(
                f"{args.dataset_name}: cannot load the dataset ({type(e).__name__}: {e})"
            ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise UserError(f"dataset has splits {list(dataset)} but no 'train' split")
        dataset = dataset["train"]
    for column, flag in ((args.image_column, "--image_column"), (args.caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise UserError(f"dataset has no column {column!r} (it has {dataset.column_names}); set {flag}")
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError("the training dataset is empty")
    # Keep the raw bytes: images are decoded by our own loader (EXIF, RGB, corrupt-file checks).
    return dataset.cast_column(args.image_column, datasets.Image(decode=False))


def load_image_folder(folder: str, cache_dir: str | None = None):
    """Every image under `folder` (with metadata.jsonl captions) as one train split.

    Given a bare folder, datasets' imagefolder infers splits from file names (COCO_val2014_1.jpg goes to
    'validation', train_0.jpg to 'train' without metadata.jsonl), so the files are named as one split.
    """
    import datasets

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: not a folder; pass an imagefolder with metadata.jsonl")
    files = [str(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not (root / "metadata.jsonl").is_file():
        raise UserError(
            f"{folder}: no metadata.jsonl with captions; write one, or build a dataset with create_dataset.py"
        )
    return datasets.load_dataset("imagefolder", data_files={"train": files}, cache_dir=cache_dir)["train"]


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


def check_images(images: TrainImages, resolution: int) -> list[str]:
    """Decode every image once, before any step: all unusable files are named together (not one crash
    mid-run), each image's size is recorded, and the warnings users need are returned as lines."""
    from .images import ImageReport, InvalidImageError, report_problems

    problems, report, small = [], ImageReport(), 0
    for index in range(len(images)):
        source, name = image_source(images.dataset[index][images.image_column])
        try:
            loaded = load_image(source, name=name, background=images.augment.background)
        except InvalidImageError as e:
            problems.append(str(e))
            continue
        report.add(loaded)
        images.sizes.append(loaded.image.size)
        small += min(loaded.image.size) < resolution
    report_problems(
        problems,
        "training images cannot be used (listed above); fix or remove them, "
        "or rebuild the dataset with create_dataset.py --skip_invalid",
    )
    warnings = []
    if small:
        warnings.append(
            f"{small} of {len(images)} images are smaller than {resolution} px and will be upscaled"
        )
    if report.counts:
        warnings.append(report.summary())
    return warnings


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


def resolve_schedule(args, plan: BatchPlan, world: int) -> None:
    """Total steps (args.max_train_steps, args.num_train_epochs) with the diffusers example's epoch/step
    arithmetic; --scale_lr applied here, where the batch size is known."""
    per_epoch = plan.steps_per_epoch(world)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / per_epoch)
    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * world
        args.learning_rate *= scale
        for flag in ("unet_lr", "text_encoder_lr"):
            if getattr(args, flag, None) is not None:
                setattr(args, flag, getattr(args, flag) * scale)
