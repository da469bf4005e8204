"""Training pictures without torchvision: each example's resize, crop and flip, from its bucket placement and
a random stream that is a pure function of (seed, epoch, index)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..buckets import BucketSettings, Placement, place_all
from ..caption_controls import CaptionControls
from ..images import load_image


def image_source(value) -> tuple[bytes | str, str]:
    """(bytes or path, name for messages) from an undecoded datasets Image value."""
    name = value.get("path") or "image"
    return (value["bytes"] if value.get("bytes") else value["path"]), name


def augmentation(seed: int, epoch: int, index: int, copy: int = 0) -> np.random.Generator:
    """The random stream for one example in one epoch: the flip, then a random crop's offsets (a later
    repeat of the image in the epoch, `copy`, has a stream of its own)."""
    return np.random.default_rng([seed, epoch, index, copy] if copy else [seed, epoch, index])


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


@dataclass(frozen=True)
class ExampleGroup:
    """A run of consecutive examples from one subset (data.subsets.Subset): how they caption and weigh."""

    name: str
    count: int
    controls: CaptionControls
    is_reg: bool = False
    weight: float = 1.0  # the loss weight of its examples (--prior_loss_weight for a regularisation set)
    repeats: int = 1
    masks: object | None = None  # data.masks.MaskSource, with --masked_loss
    buckets: tuple[tuple[str, object], ...] = ()  # its own resolution limits (BucketSettings fields)

    def describe(self) -> dict:
        """What a resume must find unchanged about this group (the dataset's fingerprint covers its images)."""
        return {
            "name": self.name, "count": self.count, "repeats": self.repeats, "is_reg": self.is_reg,
            "weight": self.weight, "controls": dataclasses.asdict(self.controls), "buckets": dict(self.buckets),
            "masks": dataclasses.asdict(self.masks) if self.masks is not None else None,
        }  # fmt: skip


class TrainImages(torch.utils.data.Dataset):
    """Examples keyed by (epoch, index) or (epoch, index, copy): the picture after augmentation, its caption,
    its flip, its loss weight (and its mask with --masked_loss). The examples come in groups, one per subset."""

    def __init__(
        self,
        dataset,
        image_column: str,
        raw_captions: list,
        augment: Augment,
        captions: CaptionControls,
        groups: list[ExampleGroup] | None = None,
    ):
        self.dataset, self.image_column = dataset, image_column
        self.raw_captions, self.augment = raw_captions, augment
        self.groups = groups or [ExampleGroup("data", len(dataset), captions)]
        self.group_of = [g for g, group in enumerate(self.groups) for _ in range(group.count)]
        self.sizes: list[tuple[int, int]] = []  # upright (width, height) of each image, set by check_images
        self.placements: list[Placement] = []  # set by place()
        self.load_pixels = True

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def controls(self) -> CaptionControls:
        """The first subset's caption controls (every subset's, when there is one)."""
        return self.groups[0].controls

    def group(self, index: int) -> ExampleGroup:
        return self.groups[self.group_of[index]]

    @property
    def varies_per_epoch(self) -> bool:
        return any(g.controls.varies_per_epoch for g in self.groups)

    @property
    def has_reg(self) -> bool:
        """Whether class (regularisation) images train beside the instance images."""
        return any(g.is_reg and g.count for g in self.groups)

    @property
    def masked(self) -> bool:
        return any(g.masks is not None for g in self.groups)

    def possible_captions(self) -> list[str]:
        """Every caption text training can use (captions that do not vary per epoch): what the text cache holds."""
        found = set()
        for g, group in enumerate(self.groups):
            raw = [c for i, c in enumerate(self.raw_captions) if self.group_of[i] == g]
            found.update(group.controls.possible_captions(raw))
        return sorted(found)

    def decorated(self, index: int) -> str:
        """The example's first caption with its subset's trigger words (held-out probes and checks)."""
        from ..caption_controls import options

        return self.group(index).controls.decorate(str(options(self.raw_captions[index])[0]))

    def place(self, settings: BucketSettings) -> None:
        """Every image's placement: the run's bucket settings, or its subset's own resolution limits."""
        placements = []
        for g, group in enumerate(self.groups):
            sizes = [size for size, of in zip(self.sizes, self.group_of) if of == g]
            placements += place_all(sizes, dataclasses.replace(settings, **dict(group.buckets)))
        self.placements = placements

    @property
    def plain(self) -> bool:
        """One group, trained once an epoch, without masks: a run as before subsets existed."""
        return len(self.groups) == 1 and self.groups[0].repeats == 1 and not self.masked

    def layout(self) -> list[dict] | None:
        """The subsets as a resume must find them (None for a plain run, whose checkpoints never said)."""
        if self.plain:
            return None
        return json.loads(json.dumps([g.describe() for g in self.groups]))  # as the checkpoint reads it back

    def flip(self, epoch: int, index: int, copy: int = 0) -> bool:
        flip = self.augment.random_flip and augmentation(self.augment.seed, epoch, index, copy).random() < 0.5
        return bool(flip)

    def crop(self, epoch: int, index: int, copy: int = 0) -> tuple[int, int]:
        """The crop corner (left, top) in the resized image: fixed, or drawn per epoch for random crops."""
        placement = self.placements[index]
        if placement.crop is not None:
            return placement.crop
        rng = augmentation(self.augment.seed, epoch, index, copy)
        rng.random()  # the flip draw, so crop offsets are the same whether or not flips are on
        slack = (placement.resized[0] - placement.bucket[0], placement.resized[1] - placement.bucket[1])
        return int(rng.integers(0, slack[0] + 1)), int(rng.integers(0, slack[1] + 1))

    def caption(self, epoch: int, index: int, copy: int = 0) -> str:
        return self.group(index).controls.caption(
            self.raw_captions[index], self.augment.seed, epoch, index, copy
        )

    def image(self, index: int) -> Image.Image:
        source, name = image_source(self.dataset[index][self.image_column])
        return load_image(source, name=name, background=self.augment.background).image

    def pixels(self, index: int, flip: bool, crop: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) in [-1, 1] at the image's bucket size."""
        return to_tensor(
            picture(self.image(index), self.placements[index], crop, self.augment.interpolation), flip
        )

    def mask(self, index: int, flip: bool, crop: tuple[int, int]) -> torch.Tensor:
        """(1, H, W) in [0, 1]: the example's mask through the same resize, crop and flip as its picture (all
        white for a subset without masks, such as class images, in a masked run)."""
        masks = self.group(index).masks
        if masks is None:
            width, height = self.placements[index].bucket
            return torch.ones(1, height, width)
        mask = masks.load(self, index)  # a grayscale PIL image at the image's own size
        array = np.asarray(picture(mask, self.placements[index], crop, "bilinear"), dtype=np.float32) / 255.0
        if flip:
            array = array[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array))[None]  # (1, H, W)

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        epoch, index, copy = (*key, 0) if len(key) == 2 else key
        flip, crop = self.flip(epoch, index, copy), self.crop(epoch, index, copy)
        group = self.group(index)
        item = {"index": index, "flip": flip, "crop": crop, "caption": self.caption(epoch, index, copy)}
        item.update(weight=group.weight, reg=group.is_reg)
        if self.load_pixels:
            item["pixel_values"] = self.pixels(index, flip, crop)
            if self.masked:
                item["mask"] = self.mask(index, flip, crop)
        return item


def collate(items: list[dict]) -> dict:
    batch = {
        "index": torch.tensor([i["index"] for i in items]),
        "flip": torch.tensor([i["flip"] for i in items]),
        "crop": [i["crop"] for i in items],
        "caption": [i["caption"] for i in items],
        "weight": torch.tensor([i.get("weight", 1.0) for i in items]),
        "reg": torch.tensor([i.get("reg", False) for i in items]),
    }
    if "pixel_values" in items[0]:
        batch["pixel_values"] = torch.stack([i["pixel_values"] for i in items])  # (B, 3, H, W), one bucket
    if "mask" in items[0]:
        batch["mask"] = torch.stack([i["mask"] for i in items])  # (B, 1, H, W)
    return batch
