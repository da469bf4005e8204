"""The training examples of a run, from every subset: the flags' one source, kohya's folders, a dataset
config, and the class images of prior preservation, in one dataset with a group per subset (its captions,
repeats, role, loss weight and masks)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..buckets import bucket_table, kohya_bucket_info
from ..caption_controls import CaptionControls
from ..class_images import generate_class_images
from ..data import DatasetSource, TrainImages, check_captions, check_images, load_train_dataset
from ..data.masks import MaskSource
from ..data.pictures import Augment, ExampleGroup
from ..data.subsets import Subset, kohya_folders, read_dataset_config, with_class_tokens
from ..errors import UserError
from ..images import report_problems
from ..metadata import RunInfo

logger = logging.getLogger(__name__)


def mask_source(masks) -> MaskSource | None:
    """The masks of the masks section (config.train's MaskConfig), or None without --masked_loss."""
    if not masks.masked_loss:
        return None
    return MaskSource(masks.mask_dir, masks.mask_column, masks.alpha_mask)


def training_subsets(cfg, controls: CaptionControls) -> list[tuple[Subset, MaskSource | None]]:
    """Every subset the configuration names (cfg: config.train.TrainConfig), instance sets first, each with
    its masks (a subset's own mask_dir or alpha_mask, else the flags', for instance sets)."""
    base, prior = DatasetSource.training(cfg.data), cfg.prior
    if prior.dataset_config:
        subsets = read_dataset_config(prior.dataset_config, base, controls)
    else:
        folder = Path(cfg.data.train_data_dir) if cfg.data.train_data_dir else None
        kohya = (
            kohya_folders(folder, False, base) if folder and not (folder / "metadata.jsonl").exists() else []
        )
        # (--instance_prompt captions every image: a folder of photos needs no caption files)
        source = dataclasses.replace(base, fallback_caption=prior.instance_prompt or base.fallback_caption)
        subsets = [_fallback(s) for s in kohya] or [
            Subset(_name(base), source, 1, controls, prior.instance_prompt)
        ]
    if prior.reg_data_dir:
        reg = [_fallback(s) for s in kohya_folders(prior.reg_data_dir, True, base)]
        if not reg:
            raise UserError(
                f"{prior.reg_data_dir}: no folders named <repeats>_<class tokens> (kohya's), e.g. 1_dog"
            )
        subsets += reg
    if prior.with_prior_preservation:
        source = DatasetSource(image_folder=prior.class_data_dir, fallback_caption=prior.class_prompt or "")
        subsets.append(Subset("class", source, 1, controls, prior.class_prompt, is_reg=True))
    masks = mask_source(cfg.masks)
    out = []
    for s in subsets:
        own = MaskSource(s.mask_dir) if s.mask_dir else MaskSource(alpha=True) if s.alpha_mask else None
        if own is not None and not cfg.masks.masked_loss:
            raise UserError(
                f"subset {s.name}: gives masks (mask_dir / alpha_mask); pass --masked_loss to train with them"
            )
        out.append(
            (
                dataclasses.replace(s, controls=s.controls or controls),
                own or (masks if not s.is_reg else None),
            )
        )
    return out


def _fallback(subset: Subset) -> Subset:
    """A kohya folder's images without a .txt caption train on the folder's class tokens."""
    tokens = with_class_tokens(subset).caption
    return dataclasses.replace(subset, source=dataclasses.replace(subset.source, fallback_caption=tokens))


def _name(source: DatasetSource) -> str:
    return Path(source.disk_path or source.image_folder or source.hub_name or "data").name


def load_examples(subsets, augment: Augment, prior_loss_weight: float, settings, tokenizer):
    """(the dataset of every subset's examples, their TrainImages): images checked (all unusable ones named
    together, refused unless --skip_invalid), masks checked, every image placed in its bucket."""
    parts, groups = [], []
    combined = len(subsets) > 1 or subsets[0][0].caption is not None  # else the dataset as it is (its
    for subset, masks in subsets:  # fingerprint keys the caches)
        ds = load_train_dataset(subset.source)
        if masks is not None and masks.column and combined:
            masks = MaskSource(column="mask")
        weight = prior_loss_weight if subset.is_reg else 1.0
        parts.append(ds)
        groups.append(
            ExampleGroup(
                subset.name,
                len(ds),
                subset.controls,
                subset.is_reg,
                weight,
                subset.repeats,
                masks,
                subset.buckets,
            )
        )
    if (
        len(parts) == 1 and subsets[0][0].caption is None
    ):  # the dataset as it is (its fingerprint keys the caches)
        source = subsets[0][0].source
        dataset, image_column, captions = parts[0], source.image_column, parts[0][source.caption_column]
    else:
        dataset = _combined(parts, subsets)
        image_column, captions = "image", dataset["text"]
    images = TrainImages(dataset, image_column, captions, augment, groups[0].controls, groups)
    upscales = settings.buckets.mode != "bucket" or not settings.buckets.no_upscale
    warnings, problems, bad = check_images(images, settings.resolution, upscales)
    skip = any(s.source.skip_invalid for s, _ in subsets)
    hint = "fix or remove them, pass --skip_invalid to train on the rest, or rebuild with create_dataset.py --skip_invalid"
    report_problems(problems, f"training images cannot be used (listed above); {hint}", fatal=not skip)
    if bad:
        dataset, images = _without(images, bad, augment)
        logger.warning(
            "--skip_invalid: training on %d images without the %d listed above", len(dataset), len(bad)
        )
    mask_problems = []
    for g, group in enumerate(images.groups):
        if group.masks is not None:
            mask_problems += group.masks.problems(
                images, [i for i in range(len(images)) if images.group_of[i] == g]
            )
    report_problems(mask_problems, "masks cannot be used (listed above); fix them or drop --masked_loss")
    images.place(settings.buckets)
    warnings += check_captions([images.decorated(i) for i in range(len(images))], tokenizer)
    for line in warnings:
        logger.warning(line)
    logger.info("buckets (resolution: images, mean aspect error):")
    for (w, h), n, err in bucket_table(images.placements):
        logger.info("  %dx%d: %d, %.1f%%", w, h, n, 100 * err)
    for group in images.groups:
        if len(images.groups) > 1 or group.repeats > 1:
            role = "class (regularisation) images" if group.is_reg else "images"
            logger.info("subset %s: %d %s, %d repeats", group.name, group.count, role, group.repeats)
    return dataset, images


def _combined(parts: list, subsets) -> object:
    """The subsets' datasets as one, each with its columns renamed to image, text (and mask), and a subset's
    fixed caption (--instance_prompt, --class_prompt) written into its text."""
    import datasets

    renamed = []
    for ds, (subset, masks) in zip(parts, subsets):
        columns = {subset.source.image_column: "image", subset.source.caption_column: "text"}
        if masks is not None and masks.column:
            columns[masks.column] = "mask"
        ds = ds.select_columns(list(columns)).rename_columns({k: v for k, v in columns.items() if k != v})
        if subset.caption is not None:
            ds = ds.remove_columns("text").add_column("text", [subset.caption] * len(ds))
        renamed.append(ds)
    return renamed[0] if len(renamed) == 1 else datasets.concatenate_datasets(_same_caption_type(renamed))


def _same_caption_type(parts: list):
    """Subsets with one caption and subsets with several: every caption a list, so the column has one type."""
    import datasets

    listed = [
        isinstance(p.features["text"], datasets.Sequence) or hasattr(p.features["text"], "feature")
        for p in parts
    ]
    if all(listed) or not any(listed):
        return parts
    return [p if is_list else p.map(lambda r: {"text": [r["text"]]}) for p, is_list in zip(parts, listed)]


def _without(images: TrainImages, bad: list[int], augment: Augment):
    """The examples without the unusable ones (the sizes were read for the usable images only, in order)."""
    skipped = set(bad)
    keep = [i for i in range(len(images)) if i not in skipped]
    dataset = images.dataset.select(keep)
    counts = [sum(1 for i in keep if images.group_of[i] == g) for g in range(len(images.groups))]
    groups = [dataclasses.replace(g, count=n) for g, n in zip(images.groups, counts) if n]
    captions = [images.raw_captions[i] for i in keep]
    out = TrainImages(dataset, images.image_column, captions, augment, groups[0].controls, groups)
    out.sizes = images.sizes
    return dataset, out


def load_data(cfg, settings, base, accelerator, seed: int):
    """(dataset, TrainImages, heldout split) of a run (cfg: config.train.TrainConfig): the class images drawn
    first where prior preservation needs them (main process; the others wait), a separate held-out set too."""
    from .setup import augmentation, caption_controls, split_heldout

    prior = cfg.prior
    if prior.with_prior_preservation:
        if accelerator.is_main_process:
            drawn = generate_class_images(
                lambda: class_pipeline(base, accelerator.device, settings.prediction_type, cfg.model.revision),
                prior.class_data_dir, prior.class_prompt, prior.num_class_images, seed, prior.sample_batch_size,
            )  # fmt: skip
            if drawn:
                logger.info("drew %d class images into %s", drawn, prior.class_data_dir)
        accelerator.wait_for_everyone()
    augment, controls = augmentation(cfg.data, seed), caption_controls(cfg.captions)
    subsets = training_subsets(cfg, controls)
    dataset, images = load_examples(subsets, augment, prior.prior_loss_weight, settings, base.tokenizer)
    source = DatasetSource.separate_heldout(cfg.heldout, cfg.data)
    separate = None
    if source is not None:
        separate = load_examples(
            [(Subset("heldout", source, 1, controls), None)], augment, 1.0, settings, base.tokenizer
        )[1]
    return dataset, images, split_heldout(cfg.heldout, seed, images, separate)


def class_pipeline(base, device, prediction_type: str, revision: str | None):
    """The base model's pipeline around its frozen modules, to draw class images (before any adapter)."""
    from ..validation import borrowed, pipeline_from_modules

    with borrowed([base.vae, *base.text_encoders], device):
        return pipeline_from_modules(
            base, base.denoiser, base.text_encoders, device, prediction_type, revision
        )


def run_info(images: TrainImages, train: list[int]) -> RunInfo:
    """What the LoRA files' metadata says of the training images: counts with repeats, buckets, each subset's
    folder and tag frequencies (kohya's ss_dataset_dirs, ss_reg_dataset_dirs, ss_tag_frequency)."""
    reg = [i for i in range(len(images)) if images.group(i).is_reg]
    trained = [i for i in train] + reg
    dirs, reg_dirs, tags = {}, {}, {}
    for g, group in enumerate(images.groups):
        members = [i for i in trained if images.group_of[i] == g]
        (reg_dirs if group.is_reg else dirs)[group.name] = {
            "n_repeats": group.repeats,
            "img_count": len(members),
        }
        tags[group.name] = group.controls.tag_frequency([images.raw_captions[i] for i in members])
    return RunInfo(
        sum(images.group(i).repeats for i in train),
        kohya_bucket_info([images.placements[i] for i in trained]),
        tags if len(images.groups) > 1 else next(iter(tags.values())),
        num_reg_images=len(reg),
        dataset_dirs=dirs,
        reg_dataset_dirs=reg_dirs,
    )
