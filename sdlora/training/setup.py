"""Everything before the first step: output folders, the frozen model, what the run derives, the training
images in their buckets, the held-out split and its probes, and the batch plan."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path

from ..buckets import bucket_table
from ..caption_controls import CaptionControls
from ..data import (
    Augment,
    BatchPlan,
    DatasetSource,
    TrainImages,
    check_captions,
    check_images,
    load_train_dataset,
)
from ..fileio import check_writable
from ..heldout import (
    MAX_TRAIN_PROBES,
    LossProbes,
    ProbeSet,
    probe_timesteps,
    split_examples,
    train_probe_indices,
)
from ..images import parse_color, report_problems
from ..models import load_base_model, place_frozen_model, resolve_model, set_memory_options
from .settings import RunSettings

logger = logging.getLogger(__name__)


def check_output_folders(outputs, cache) -> None:
    """Refuse, before any work, folders the run could not write to (a read-only mount, a full disk)."""
    check_writable(outputs.output_dir, "--output_dir")
    check_writable(Path(outputs.output_dir) / outputs.logging_dir, "--logging_dir")
    if cache.latents_cache_dir and (cache.cache_latents_to_disk or cache.cache_latents is not False):
        check_writable(cache.latents_cache_dir, "--latents_cache_dir")


def cache_root(outputs, cache) -> Path:
    """Where on-disk caches go: --latents_cache_dir, else <output_dir>/cache."""
    return Path(cache.latents_cache_dir or Path(outputs.output_dir) / "cache")


def load_model(model, speed, train_text_encoder: bool, device, dtype):
    """The frozen base model (the built-in tiny model by default) in the half type on the device (model:
    config.train.ModelConfig, speed: SpeedConfig)."""
    vae = model.pretrained_vae_model_name_or_path
    base = load_base_model(
        resolve_model(model.pretrained_model_name_or_path), model.revision, model.variant, vae
    )
    place_frozen_model(base, device, dtype, base.family.vae_fp16_safe or bool(vae))
    set_memory_options(
        base,
        speed.gradient_checkpointing,
        train_text_encoder,
        speed.enable_xformers_memory_efficient_attention,
        speed.channels_last,
    )
    return base


def caption_controls(captions) -> CaptionControls:
    """The caption controls of the captions section (config.train.CaptionConfig)."""
    return CaptionControls(
        captions.caption_prefix,
        captions.caption_suffix,
        captions.caption_dropout_rate,
        captions.shuffle_caption,
        captions.keep_tokens,
        captions.caption_separator,
        captions.caption_tag_dropout_rate,
    )


def augmentation(data, seed: int) -> Augment:
    """The per-example picture settings of the data section (config.train.DataConfig)."""
    return Augment(seed, data.random_flip, data.image_interpolation_mode, parse_color(data.background))


def load_images(
    source: DatasetSource, augment: Augment, controls: CaptionControls, settings: RunSettings, tokenizer
) -> tuple[object, TrainImages]:
    """A dataset and its per-example view: every image checked (all unusable ones named together, and
    refused unless --skip_invalid) and placed in its bucket; warnings and the bucket table logged."""
    dataset = load_train_dataset(source)
    images = TrainImages(dataset, source.image_column, dataset[source.caption_column], augment, controls)
    upscales = settings.buckets.mode != "bucket" or not settings.buckets.no_upscale
    warnings, problems, bad = check_images(images, settings.resolution, upscales)
    hint = "fix or remove them, pass --skip_invalid to train on the rest, or rebuild with create_dataset.py --skip_invalid"
    report_problems(
        problems, f"training images cannot be used (listed above); {hint}", fatal=not source.skip_invalid
    )
    if bad:  # (the sizes were read for the usable images only, in order)
        sizes, skipped = images.sizes, set(bad)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in skipped])
        images = TrainImages(dataset, source.image_column, dataset[source.caption_column], augment, controls)
        images.sizes = sizes
        logger.warning(
            "--skip_invalid: training on %d images without the %d listed above", len(dataset), len(bad)
        )
    images.place(settings.buckets)
    warnings += check_captions([controls.decorate(str(c)) for c in images.raw_captions], tokenizer)
    for line in warnings:
        logger.warning(line)
    logger.info("buckets (resolution: images, mean aspect error):")
    for (w, h), n, err in bucket_table(images.placements):
        logger.info("  %dx%d: %d, %.1f%%", w, h, n, 100 * err)
    return dataset, images


def cache_blockers(random_crop: bool, train_text_encoder: bool, controls: CaptionControls):
    """(why the latents, why the text embeddings cannot be cached), None where they can."""
    latents = "random crops (--random_crop) differ every epoch" if random_crop else None
    text = (
        "the text encoder is trained (--train_text_encoder)"
        if train_text_encoder
        else "--shuffle_caption / --caption_tag_dropout_rate change captions every epoch (under 2% of a step)"
        if controls.varies_per_epoch
        else None
    )
    return latents, text


def preprocessing(augment: Augment, buckets) -> dict:
    """Every setting a training picture depends on: what keys the latent cache."""
    return {
        "buckets": asdict(buckets),
        "flip": augment.random_flip,
        "interpolation": augment.interpolation,
        "background": augment.background,
    }


@dataclasses.dataclass(frozen=True)
class HeldoutSplit:
    """Which dataset indices train, and the held-out set (the training set's images, or a separate one)."""

    train: list[int]
    held_images: TrainImages | None  # None: no held-out set
    held: list[int]


def split_heldout(heldout, seed: int, images: TrainImages, separate: TrainImages | None) -> HeldoutSplit:
    """--validation_split holds images of the training set out (heldout: config.train.HeldoutConfig);
    --validation_data_dir or --validation_dataset_disk_path name a `separate` set, loaded by the caller."""
    if heldout.validation_split:
        train, held = split_examples(len(images), heldout.validation_split, seed)
        return HeldoutSplit(train, images, held)
    everything = list(range(len(images)))
    if separate is None:
        return HeldoutSplit(everything, None, [])
    return HeldoutSplit(everything, separate, list(range(len(separate))))


def make_probes(
    heldout, seed: int, split: HeldoutSplit, images, latent_cache, base, objective, device, dtype
) -> LossProbes | None:
    """The held-out probes and the same number of training images beside them (None without a held-out set)."""
    if split.held_images is None:
        return None
    timesteps = probe_timesteps(heldout.validation_loss_timesteps, objective.num_train_timesteps)
    held = ProbeSet(split.held_images, latent_cache if split.held_images is images else None, split.held)
    k = min(len(split.held), len(split.train), MAX_TRAIN_PROBES)
    sample = ProbeSet(images, latent_cache, train_probe_indices(split.train, k, seed))
    logger.info(
        "held-out loss: %d images, %d training images beside them, timesteps %s",
        len(split.held),
        k,
        timesteps,
    )
    return LossProbes(base, objective, held, sample, timesteps, seed, device, dtype)


def plan_batches(opt, images: TrainImages, train: list[int]) -> BatchPlan:
    """The batch plan of the training images (opt: config.train.OptimizationConfig): their buckets, batch
    size, accumulation, seed."""
    buckets = [images.placements[i].bucket for i in train]
    return BatchPlan(train, buckets, opt.train_batch_size, opt.gradient_accumulation_steps, opt.seed)
