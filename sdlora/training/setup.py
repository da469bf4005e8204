"""Everything before the first step: output folders, the frozen model, what the run derives, the training
images in their buckets, the held-out split and its probes, and the batch plan."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path

from ..caption_controls import CaptionControls
from ..data import (
    Augment,
    BatchPlan,
    TrainImages,
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
from ..images import parse_color
from ..models import load_base_model, place_frozen_model, resolve_model, set_memory_options

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
        resolve_model(model.pretrained_model_name_or_path),
        model.revision,
        model.variant,
        vae,
        model.t5_max_length,
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


def cache_blockers(random_crop: bool, train_text_encoder: bool, images: TrainImages):
    """(why the latents, why the text embeddings cannot be cached), None where they can."""
    latents = "random crops (--random_crop) differ every epoch" if random_crop else None
    text = (
        "the text encoder is trained (--train_text_encoder)"
        if train_text_encoder
        else "--shuffle_caption / --caption_tag_dropout_rate change captions every epoch (under 2% of a step)"
        if images.varies_per_epoch
        else None
    )
    return latents, text


def preprocessing(images: TrainImages, buckets) -> dict:
    """Every setting a training picture (and its mask) depends on: what keys the latent cache."""
    augment = images.augment
    settings = {
        "buckets": asdict(buckets),
        "flip": augment.random_flip,
        "interpolation": augment.interpolation,
        "background": augment.background,
    }
    # (a plain run's key stays what it was before masks and subsets existed: its caches are reused)
    if images.masked:
        settings["masks"] = [g.masks.fingerprint() if g.masks else None for g in images.groups]
    if any(g.buckets for g in images.groups):
        settings["subset_buckets"] = [dict(g.buckets) for g in images.groups]
    return settings


@dataclasses.dataclass(frozen=True)
class HeldoutSplit:
    """Which dataset indices train, and the held-out set (the training set's images, or a separate one)."""

    train: list[int]
    held_images: TrainImages | None  # None: no held-out set
    held: list[int]


def split_heldout(heldout, seed: int, images: TrainImages, separate: TrainImages | None) -> HeldoutSplit:
    """--validation_split holds instance images of the training set out (heldout: config.train.HeldoutConfig;
    class images never); --validation_data_dir or --validation_dataset_disk_path name a `separate` set,
    loaded by the caller."""
    instances = [i for i in range(len(images)) if not images.group(i).is_reg]
    if heldout.validation_split:
        train, held = split_examples(len(instances), heldout.validation_split, seed)
        return HeldoutSplit([instances[i] for i in train], images, [instances[i] for i in held])
    if separate is None:
        return HeldoutSplit(instances, None, [])
    return HeldoutSplit(instances, separate, list(range(len(separate))))


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
    """The batch plan of the training images (opt: config.train.OptimizationConfig): their buckets and
    repeats, the class images beside them, batch size, accumulation, seed."""
    reg = tuple(i for i in range(len(images)) if images.group(i).is_reg)
    repeats = tuple(images.group(i).repeats for i in train)
    return BatchPlan(
        train,
        [images.placements[i].bucket for i in train],
        opt.train_batch_size,
        opt.gradient_accumulation_steps,
        opt.seed,
        repeats if any(r > 1 for r in repeats) else None,
        reg,
        tuple(images.placements[i].bucket for i in reg),
    )
