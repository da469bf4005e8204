"""Subsets of the training data: each a source of images with its own repeats, captions and their controls,
masks and role (an instance or a regularisation/class set), as kohya's dataset configs and folder names
describe them.

- the flags alone: one subset (--train_data_dir / --dataset_disk_path / --dataset_name), plus the class
  images with --with_prior_preservation (diffusers' DreamBooth names);
- kohya's folders: a --train_data_dir whose subfolders are named `<repeats>_<class tokens>` (`10_sks dog`),
  and --reg_data_dir with the regularisation images' folders (`1_dog`); captions from `.txt` files beside the
  images, else the folder's class tokens;
- --dataset_config FILE (TOML): `[[subsets]]` tables, or kohya's `[general]` and `[[datasets]]` holding
  `[[datasets.subsets]]` (a subset inherits what its dataset and [general] set), with kohya's keys
  (image_dir, num_repeats, is_reg, class_tokens, caption_prefix, shuffle_caption, keep_tokens,
  caption_dropout_rate, ..., and resolution limits: resolution, min/max_bucket_reso, bucket_no_upscale).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from ..caption_controls import CaptionControls
from ..errors import UserError
from .sources import DatasetSource

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# A dataset config's subset keys, kohya's names, and what each becomes.
SUBSET_KEYS = {
    "image_dir", "dataset_disk_path", "dataset_name", "num_repeats", "is_reg", "class_tokens", "caption_column",
    "image_column", "caption_prefix", "caption_suffix", "shuffle_caption", "keep_tokens", "caption_separator",
    "caption_dropout_rate", "caption_tag_dropout_rate", "mask_dir", "alpha_mask", "name", "caption_extension",
    *("resolution", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"),
}  # fmt: skip
# Keys kohya allows in [general] and [[datasets]] (inherited by their subsets) that are the run's here.
RUN_KEYS = {"batch_size": "--train_batch_size", "enable_bucket": "--crop_mode"}
# A subset's resolution limits (kohya's names) and the data.buckets.BucketSettings field each sets.
BUCKET_KEYS = {
    "resolution": "resolution",
    "min_bucket_reso": "min_reso",
    "max_bucket_reso": "max_reso",
    "bucket_reso_steps": "step",
    "bucket_no_upscale": "no_upscale",
}


@dataclass(frozen=True)
class Subset:
    """One source of training images and how its examples train."""

    name: str  # for the metadata's ss_dataset_dirs and messages
    source: DatasetSource
    repeats: int = 1  # kohya's num_repeats: how many times each image trains an epoch
    controls: CaptionControls | None = None  # None: the run's (--caption_prefix, --shuffle_caption, ...)
    caption: str | None = (
        None  # every image's caption (instance or class prompt, class tokens); None: its own
    )
    is_reg: bool = False  # a regularisation (class) set: weighted by --prior_loss_weight, balanced per epoch
    mask_dir: str | None = None  # masks for --masked_loss, named like the images
    alpha_mask: bool = False  # the images' own alpha channel as the mask
    buckets: tuple[tuple[str, object], ...] = ()  # its own resolution limits (BucketSettings fields)


def kohya_folders(root: str | Path, is_reg: bool, base: DatasetSource) -> list[Subset]:
    """kohya's layout: one subset per subfolder named `<repeats>_<class tokens>`; [] if there is none."""
    root = Path(root)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        match = KOHYA_FOLDER.match(folder.name)
        if match:
            source = dataclasses.replace(base, disk_path=None, image_folder=str(folder), hub_name=None)
            found.append(Subset(folder.name, source, int(match[1]), caption=None, is_reg=is_reg))
    return found


def with_class_tokens(subset: Subset) -> Subset:
    """A kohya folder's images without caption files train on the folder's class tokens."""
    match = KOHYA_FOLDER.match(Path(subset.source.image_folder or "").name)
    return dataclasses.replace(subset, caption=match[2]) if match else subset


def read_dataset_config(path: str | Path, base: DatasetSource, controls: CaptionControls) -> list[Subset]:
    """The subsets of a --dataset_config TOML file: `[[subsets]]` (or kohya's `[[datasets]]` holding
    `[[datasets.subsets]]`) with kohya's keys; caption controls a subset leaves out are the run's."""
    from ..config.flags import read_config_file

    path = Path(path)
    table = read_config_file(path)
    general = table.get("general", {})
    tables = [{**general, **s} for s in table.get("subsets", [])] + [
        {**general, **{k: v for k, v in d.items() if k != "subsets"}, **s}  # kohya: subsets inherit
        for d in table.get("datasets", [])
        for s in d.get("subsets", [])
    ]
    if not tables:
        raise UserError(
            f"{path}: no [[subsets]] table; each subset names an image_dir, dataset_disk_path or dataset_name"
        )
    subsets = []
    for n, entry in enumerate(tables, 1):
        for key, flag in RUN_KEYS.items():
            if key in entry and not (key == "enable_bucket" and entry[key] is True):
                raise UserError(
                    f"{path}: subset {n}: {key} is the run's setting here; drop it and pass {flag}"
                )
        entry = {k: v for k, v in entry.items() if k not in RUN_KEYS}
        if entry.get("caption_extension", ".txt") != ".txt":
            source_ext = entry["caption_extension"]
            raise UserError(
                f"{path}: subset {n}: caption_extension {source_ext!r}: captions are read from .txt files"
            )
        entry.pop("caption_extension", None)
        unknown = set(entry) - SUBSET_KEYS
        if unknown:
            raise UserError(
                f"{path}: subset {n}: unknown key {sorted(unknown)[0]!r}; keys are {', '.join(sorted(SUBSET_KEYS))}"
            )
        places = [k for k in ("image_dir", "dataset_disk_path", "dataset_name") if entry.get(k)]
        if len(places) != 1:
            raise UserError(f"{path}: subset {n}: give one of image_dir, dataset_disk_path or dataset_name")
        where = entry[places[0]]
        if places[0] != "dataset_name" and not Path(where).exists():
            raise UserError(f"{path}: subset {n}: {where} does not exist; fix its {places[0]}")
        source = dataclasses.replace(
            base,
            disk_path=entry.get("dataset_disk_path"),
            image_folder=entry.get("image_dir"),
            hub_name=entry.get("dataset_name"),
            image_column=entry.get("image_column", base.image_column),
            caption_column=entry.get("caption_column", base.caption_column),
            max_samples=None,
        )
        own = {k: entry[k] for k in _CONTROL_KEYS if k in entry}
        subset_controls = dataclasses.replace(controls, **{_CONTROL_KEYS[k]: v for k, v in own.items()})
        repeats = int(entry.get("num_repeats", 1))
        if repeats < 1:
            raise UserError(f"{path}: subset {n}: num_repeats must be at least 1")
        subsets.append(
            Subset(
                str(entry.get("name", where)),
                source,
                repeats,
                subset_controls,
                entry.get("class_tokens"),
                bool(entry.get("is_reg", False)),
                entry.get("mask_dir"),
                bool(entry.get("alpha_mask", False)),
                _bucket_limits(entry, f"{path}: subset {n}"),
            )
        )
    return subsets


def _bucket_limits(entry: dict, where: str) -> tuple[tuple[str, object], ...]:
    """A subset's own resolution limits (kohya's resolution, min/max_bucket_reso, bucket_reso_steps,
    bucket_no_upscale), checked as the flags are."""
    limits = {}
    for key, name in BUCKET_KEYS.items():
        if key not in entry:
            continue
        value = entry[key]
        if key == "resolution" and isinstance(value, list):  # kohya's [width, height]: that area
            value = int((value[0] * value[1]) ** 0.5)
        if key == "bucket_no_upscale":
            limits[name] = bool(value)
        elif not isinstance(value, int) or isinstance(value, bool) or value < 8:
            raise UserError(f"{where}: {key} {value!r} must be a whole number of pixels, at least 8")
        else:
            limits[name] = value
    return tuple(sorted(limits.items()))


_CONTROL_KEYS = {
    "caption_prefix": "prefix",
    "caption_suffix": "suffix",
    "caption_dropout_rate": "dropout_rate",
    "shuffle_caption": "shuffle",
    "keep_tokens": "keep_tokens",
    "caption_separator": "separator",
    "caption_tag_dropout_rate": "tag_dropout_rate",
}
