"""The sections for teaching a subject: prior preservation with class images (diffusers' DreamBooth names,
kohya's --reg_data_dir), the masked loss (kohya's names), and a dataset config of subsets."""

from __future__ import annotations

from dataclasses import dataclass

from .flags import flag


@dataclass(frozen=True)
class PriorConfig:
    """prior preservation: class images trained beside the subject's, so the class keeps its look"""

    instance_prompt: str | None = flag(
        None, "the caption of every training image (default: each its own)", resume=True
    )
    with_prior_preservation: bool = flag(
        False, "train on class images too (--class_data_dir), weighted by --prior_loss_weight", resume=True
    )
    class_data_dir: str | None = flag(
        None, "class images; missing ones are drawn with the base model", resume=True
    )
    class_prompt: str | None = flag(
        None, "the class images' caption and what they are drawn from", resume=True
    )
    num_class_images: int = flag(
        100, "how many class images to have (drawn with the base model if fewer)", resume=True
    )
    prior_loss_weight: float = flag(1.0, "the weight of the class images' loss", resume=True)
    sample_batch_size: int = flag(4, "batch size while drawing class images")
    reg_data_dir: str | None = flag(
        None,
        "kohya's regularisation folders (<repeats>_<class tokens>), trained as class images",
        resume=True,
    )
    dataset_config: str | None = flag(
        None,
        "a TOML file of [[subsets]] (kohya's keys: image_dir, num_repeats, is_reg, class_tokens, ...)",
        resume=True,
    )


@dataclass(frozen=True)
class MaskConfig:
    """masked loss: learn only where a mask is white"""

    masked_loss: bool = flag(
        False, "weight the loss by a mask per image (--mask_dir, a mask column or --alpha_mask)", resume=True
    )
    mask_dir: str | None = flag(
        None, "grayscale masks named like the training images (white: learn)", resume=True
    )
    mask_column: str | None = flag(None, "the dataset column holding the masks", resume=True)
    alpha_mask: bool = flag(False, "the images' own alpha channel is the mask", resume=True)


def subject_errors(cfg) -> list[str]:
    """What cannot work among these settings (cfg: config.train.TrainConfig)."""
    errors, prior, masks = [], cfg.prior, cfg.masks
    if prior.with_prior_preservation and not prior.class_data_dir:
        errors.append("--with_prior_preservation needs --class_data_dir (a folder for the class images)")
    if prior.num_class_images < 1 or prior.sample_batch_size < 1:
        errors.append("--num_class_images and --sample_batch_size must be at least 1")
    if prior.prior_loss_weight < 0:
        errors.append("--prior_loss_weight must be 0 or more")
    sources = [
        n
        for n, v in (
            ("--mask_dir", masks.mask_dir),
            ("--mask_column", masks.mask_column),
            ("--alpha_mask", masks.alpha_mask),
        )
        if v
    ]
    if len(sources) > 1:
        errors.append(f"pass one of {', '.join(sources)}, not several")
    if masks.masked_loss and not sources and not prior.dataset_config:
        errors.append("--masked_loss needs the masks: --mask_dir, --mask_column or --alpha_mask")
    if sources and not masks.masked_loss:
        errors.append(f"{sources[0]} gives masks for --masked_loss; pass --masked_loss too")
    if masks.masked_loss and cfg.buckets.random_crop:
        errors.append(
            "--masked_loss and --random_crop: masks are cached with the latents; use buckets or --center_crop"
        )
    return errors
