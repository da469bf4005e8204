"""Training data: load the dataset, preprocess images without torchvision, and plan every batch.

Augmentation randomness (crop offsets, flips) and the batch order are pure functions of
(seed, epoch, example index), not of a random state that runs forward; so a resumed run sees
exactly the batches and augmentations an uninterrupted run would, in any number of worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
        if not Path(args.train_data_dir).is_dir():
            raise UserError(f"{args.train_data_dir}: not a folder; pass an imagefolder with metadata.jsonl")
        dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
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


def image_source(value) -> tuple[bytes | str, str]:
    """(bytes or path, name for messages) from an undecoded datasets Image value."""
    name = value.get("path") or "image"
    return (value["bytes"] if value.get("bytes") else value["path"]), name


def augmentation(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream for one example in one epoch (crop offset, flip)."""
    return np.random.default_rng([seed, epoch, index])


RESAMPLE = {
    "lanczos": Image.LANCZOS,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
}


def resize_and_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    rng: np.random.Generator,
    resample: str = "lanczos",
) -> Image.Image:
    """Resize the short side to `resolution` (PIL's filters antialias when shrinking), then crop a square."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), RESAMPLE[resample])
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image, flip: bool) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)  # (3, H, W)
    return tensor / 127.5 - 1.0


class TrainImages(torch.utils.data.Dataset):
    """Examples keyed by (epoch, index): pixels after augmentation, tokenised caption, flip flag."""

    def __init__(self, dataset, args, tokenizer, load_pixels: bool = True):
        self.dataset, self.args, self.tokenizer, self.load_pixels = dataset, args, tokenizer, load_pixels
        self.captions = ["" if c is None else str(c) for c in dataset[args.caption_column]]
        self.sizes: list[tuple[int, int]] = []  # upright (width, height) of each image, set by check_images

    def has_crop_slack(self) -> bool:
        """True if some image is not square, so a random crop would differ between epochs."""
        return any(w != h for w, h in self.sizes)

    def __len__(self) -> int:
        return len(self.dataset)

    def flip(self, epoch: int, index: int) -> bool:
        return bool(self.args.random_flip and augmentation(self.args.seed, epoch, index).random() < 0.5)

    def pixels(self, epoch: int, index: int, flip: bool) -> torch.Tensor:
        source, name = image_source(self.dataset[index][self.args.image_column])
        image = load_image(source, name=name, background=self.args.background_rgb).image
        rng = augmentation(self.args.seed, epoch, index)
        rng.random()  # the flip draw, so crop offsets are the same whether or not flips are on
        square = resize_and_crop(
            image, self.args.resolution, self.args.center_crop, rng, self.args.image_interpolation_mode
        )
        return to_tensor(square, flip)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        flip = self.flip(epoch, index)
        item = {"index": index, "flip": flip}
        if self.load_pixels:
            item["pixel_values"] = self.pixels(epoch, index, flip)
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "index": torch.tensor([i["index"] for i in items]),
        "flip": torch.tensor([i["flip"] for i in items]),
    }
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in items])
    return batch


@dataclass
class Step:
    """One optimizer step: its micro-batches (lists of (epoch, index) keys) and where it sits in the run."""

    number: int  # 1-based global step
    epoch: int
    micro_batches: list[list[tuple[int, int]]]
    last_of_epoch: bool


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches for one epoch: a seeded shuffle, padded by wrap-around so every process
    gets the same number of full batches (like accelerate's even_batches)."""
    order = np.random.default_rng([seed, epoch, 1]).permutation(n).tolist()
    per_step = batch_size * world
    total = math.ceil(n / per_step) * per_step
    order = (order * math.ceil(total / n))[:total]
    return [order[s + rank * batch_size : s + (rank + 1) * batch_size] for s in range(0, total, per_step)]


def steps_per_epoch(n: int, batch_size: int, world: int, accumulation: int) -> int:
    return math.ceil(math.ceil(n / (batch_size * world)) / accumulation)


def plan_steps(n: int, args, rank: int, world: int, total_steps: int) -> list[Step]:
    """Every optimizer step of the run, in order; a step never spans an epoch boundary."""
    steps: list[Step] = []
    epoch = 0
    while len(steps) < total_steps:
        batches = [
            [(epoch, i) for i in b]
            for b in epoch_batches(n, args.train_batch_size, args.seed, epoch, rank, world)
        ]
        groups = [
            batches[s : s + args.gradient_accumulation_steps]
            for s in range(0, len(batches), args.gradient_accumulation_steps)
        ]
        for g, group in enumerate(groups):
            steps.append(Step(len(steps) + 1, epoch, group, g == len(groups) - 1))
            if len(steps) == total_steps:
                break
        epoch += 1
    return steps


def check_images(images: TrainImages) -> list[str]:
    """Decode every training image once, before any step: all unusable files are named together
    (not one crash mid-run), and the warnings users need are returned as lines."""
    from .images import ImageReport, InvalidImageError, report_problems

    args, problems, report, small = images.args, [], ImageReport(), 0
    for index in range(len(images)):
        source, name = image_source(images.dataset[index][args.image_column])
        try:
            loaded = load_image(source, name=name, background=args.background_rgb)
        except InvalidImageError as e:
            problems.append(str(e))
            continue
        report.add(loaded)
        images.sizes.append(loaded.image.size)
        small += min(loaded.image.size) < args.resolution
    report_problems(
        problems,
        "training images cannot be used (listed above); fix or remove them, "
        "or rebuild the dataset with create_dataset.py --skip_invalid",
    )
    warnings = []
    if small:
        warnings.append(
            f"{small} of {len(images)} images are smaller than {args.resolution} px and will be upscaled"
        )
    if report.counts:
        warnings.append(report.summary())
    empty = sum(not c.strip() for c in images.captions)
    if empty:
        warnings.append(f"{empty} captions are empty; those images train as unconditional examples")
    tokenizer = images.tokenizer
    limit = tokenizer.model_max_length
    long = [c for c in images.captions if len(tokenizer(c).input_ids) > limit]
    if long:
        warnings.append(
            f"{len(long)} captions are longer than {limit} tokens; the text encoder sees only their first "
            f"{limit} tokens (start and end tokens included), e.g. {long[0][:80]!r}"
        )
    return warnings


def plan_training(args, n_examples: int, rank: int, world: int) -> list[Step]:
    """Total steps (args.max_train_steps, args.num_train_epochs) and every step's batches, with the
    diffusers example's epoch/step arithmetic; --scale_lr applied here, where the batch size is known."""
    per_epoch = steps_per_epoch(n_examples, args.train_batch_size, world, args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / per_epoch)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world
    return plan_steps(n_examples, args, rank, world, args.max_train_steps)
