"""The checks that run once on a whole training configuration, each failure the message the user sees."""

from __future__ import annotations

from .flow import flow_errors
from .levers import lever_errors
from .networks import network_errors
from .subject import subject_errors
from .train import BucketConfig, TrainConfig


def config_errors(cfg: TrainConfig) -> list[str]:
    """What is wrong with a configuration, each as the message the user sees (flags named)."""
    errors = []
    data, opt, held = cfg.data, cfg.optimization, cfg.heldout
    given = data.dataset_from_disk or data.train_data_dir or data.dataset_name
    if not (given or cfg.prior.dataset_config):
        errors.append(
            "no training data: pass --dataset_from_disk (with --dataset_disk_path), --train_data_dir, "
            "--dataset_name or --dataset_config"
        )
    if given and cfg.prior.dataset_config:
        errors.append(
            "--dataset_config names the training data itself: drop --train_data_dir / --dataset_name"
        )
    if cfg.validation.validation_prompt and cfg.validation.validation_prompts_dir:
        errors.append("pass --validation_prompt or --validation_prompts_dir, not both")
    if cfg.buckets.center_crop and cfg.buckets.random_crop:
        errors.append("pass --center_crop or --random_crop, not both (neither: aspect-ratio buckets)")
    at_least_one = {
        "rank": cfg.adapter.rank,
        "train_batch_size": opt.train_batch_size,
        "num_train_epochs": opt.num_train_epochs,
        "gradient_accumulation_steps": opt.gradient_accumulation_steps,
        "checkpointing_steps": cfg.checkpoints.checkpointing_steps,
        "logging_steps": cfg.outputs.logging_steps,
        "cache_batch_size": cfg.cache.cache_batch_size,
        "validation_epochs": cfg.validation.validation_epochs,
        "num_validation_images": cfg.validation.num_validation_images,
        "validation_steps": cfg.validation.validation_steps,
        "checkpoints_total_limit": cfg.checkpoints.checkpoints_total_limit,
        "conv_rank": cfg.adapter.conv_rank,
        "max_train_steps": opt.max_train_steps,
        "max_train_samples": data.max_train_samples,
        "validation_loss_steps": held.validation_loss_steps,
        "early_stopping_patience": held.early_stopping_patience,
    }
    errors += [f"--{name} must be at least 1" for name, v in at_least_one.items() if v is not None and v < 1]
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= getattr(cfg.captions, name) < 1:
            errors.append(f"--{name} must be in [0, 1)")
    if not 0 <= cfg.adapter.lora_dropout < 1:
        errors.append("--lora_dropout must be in [0, 1)")
    held_out = [
        f"--{n}"
        for n in ("validation_split", "validation_data_dir", "validation_dataset_disk_path")
        if getattr(held, n)
    ]
    if len(held_out) > 1:
        errors.append(f"pass one of {', '.join(held_out)}, not several")
    if held.early_stopping_patience is not None and not held_out:
        errors.append(
            "--early_stopping_patience needs a held-out set: pass --validation_split or --validation_data_dir"
        )
    if cfg.captions.keep_tokens < 0:
        errors.append("--keep_tokens must be 0 or more")
    if data.resolution is not None and (data.resolution < 8 or data.resolution % 8):
        errors.append(
            f"--resolution {data.resolution}: must be a positive multiple of 8 (the VAE's downsampling)"
        )
    errors += _bucket_errors(cfg.buckets)
    return errors + lever_errors(cfg) + network_errors(cfg) + flow_errors(cfg) + subject_errors(cfg)


def _bucket_errors(buckets: BucketConfig) -> list[str]:
    """kohya's rule: bucket sides are multiples of --bucket_reso_steps, so explicit bounds must be too."""
    step = buckets.bucket_reso_steps
    if step is not None and (step < 8 or step % 8):
        return ["--bucket_reso_steps must be a multiple of 8 (the VAE's downsampling)"]
    errors = []
    for name in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(buckets, name)
        if value is None:
            continue
        if value < 8:
            errors.append(f"--{name} {value}: must be positive")
        elif step is not None and value % step:
            errors.append(f"--{name} {value}: must be a multiple of --bucket_reso_steps {step}")
    low, high = buckets.min_bucket_reso, buckets.max_bucket_reso
    if low is not None and high is not None and low > high:
        errors.append(f"--min_bucket_reso {low} is above --max_bucket_reso {high}")
    return errors
