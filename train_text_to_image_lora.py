"""Train a LoRA on a Stable Diffusion UNet. Flag names follow the diffusers example script.

    accelerate launch --quiet --cpu train_text_to_image_lora.py --dataset_from_disk \
        --dataset_disk_path datasets/Text2Image_example --max_train_steps 50 --output_dir output/tiny-lora

With no --pretrained_model_name_or_path it trains the built-in tiny model (CPU, seconds). With a real
model (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) it trains at that model's native resolution.
Writes <output_dir>/pytorch_lora_weights.safetensors, checkpoint-<step>/ folders, validation/step-<N>/
PNGs, TensorBoard logs under <output_dir>/logs, args.json and a model card.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import UserError, run_cli
from sdlora.faults import trace
from sdlora.lora import LAYER_SETS

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Hub id or local diffusers folder (default: built-in tiny model)",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="another VAE (folder or Hub id), e.g. SDXL's fp16-fixed VAE; default: the model's own",
    )
    g.add_argument("--revision", default=None, help="model revision on the Hub")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank")
    g.add_argument(
        "--lora_alpha",
        type=float,
        default=None,
        help="LoRA alpha (scale = alpha / rank); default: equal to --rank",
    )
    g.add_argument(
        "--lora_layers",
        choices=LAYER_SETS,
        default="attn",
        help="attn: the UNet's attention projections (the diffusers example's); attn_ff: every Linear and 1x1 "
        "conv of the transformer blocks (kohya's default); all: plus the ResNet and sampler convs (LoCon)",
    )
    g.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="explicit UNet module names (or name suffixes) to adapt, instead of --lora_layers",
    )
    g.add_argument(
        "--conv_rank",
        "--conv_dim",
        type=int,
        default=None,
        help="rank of the 3x3 convs with --lora_layers all (default: --rank)",
    )
    g.add_argument(
        "--conv_alpha", type=float, default=None, help="alpha of the 3x3 convs (default: --conv_rank)"
    )
    g.add_argument("--use_dora", action="store_true", help="weight-decomposed LoRA (DoRA, peft's use_dora)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA path")
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="also train LoRA on the text encoder(s) (turns the text-embedding cache off)",
    )
    g.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default=None,
        help="override the scheduler's prediction type",
    )
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="use xformers attention (PyTorch's SDPA is used otherwise)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset_from_disk",
        action="store_true",
        help="load a dataset saved by create_dataset.py from --dataset_disk_path",
    )
    g.add_argument(
        "--dataset_disk_path",
        default="datasets/Text2Image_example",
        help="folder written by create_dataset.py",
    )
    g.add_argument("--train_data_dir", default=None, help="imagefolder with images and metadata.jsonl")
    g.add_argument("--dataset_name", default=None, help="dataset on the Hugging Face Hub")
    g.add_argument("--dataset_config_name", default=None, help="config of the Hub dataset")
    g.add_argument("--cache_dir", default=None, help="where downloaded models and datasets are stored")
    g.add_argument("--image_column", default="image", help="dataset column holding the images")
    g.add_argument("--caption_column", default="text", help="dataset column holding the captions")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N examples")
    g.add_argument(
        "--resolution", type=int, default=None, help="training resolution (default: the model's native size)"
    )
    g.add_argument(
        "--enable_bucket",
        action="store_true",
        help="aspect-ratio buckets (the default unless --center_crop or --random_crop; accepted for kohya's command lines)",
    )
    g.add_argument("--center_crop", action="store_true", help="square center crops instead of buckets")
    g.add_argument(
        "--random_crop",
        action="store_true",
        help="square random crops instead of buckets (the diffusers example's default; cannot cache latents)",
    )
    g.add_argument(
        "--bucket_reso_steps",
        type=int,
        default=None,
        help="bucket sides are multiples of this (default: 64, or the model's minimum for small models)",
    )
    g.add_argument(
        "--min_bucket_reso", type=int, default=None, help="smallest bucket side (default: resolution / 2)"
    )
    g.add_argument(
        "--max_bucket_reso", type=int, default=None, help="largest bucket side (default: resolution x 2)"
    )
    g.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="never enlarge small images: bucket at their own size",
    )
    g.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
    g.add_argument("--caption_prefix", default="", help="text put before every caption, e.g. a trigger word")
    g.add_argument("--caption_suffix", default="", help="text put after every caption")
    g.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="fraction of examples trained with an empty caption",
    )
    g.add_argument(
        "--shuffle_caption", action="store_true", help="shuffle the tags of each caption every epoch"
    )
    g.add_argument(
        "--keep_tokens", type=int, default=0, help="with --shuffle_caption: the first N tags stay in place"
    )
    g.add_argument("--caption_separator", default=",", help="what separates tags in a caption")
    g.add_argument(
        "--caption_tag_dropout_rate",
        type=float,
        default=0.0,
        help="drop each tag (after --keep_tokens) with this chance",
    )
    g.add_argument(
        "--image_interpolation_mode",
        default="lanczos",
        choices=["lanczos", "bilinear", "bicubic", "nearest"],
        help="resampling filter for resizing",
    )
    g.add_argument("--background", default="white", help="colour transparent images are composited on")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="data loading worker processes")

    g = p.add_argument_group("speed")
    g.add_argument(
        "--cache_latents",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encode each image with the VAE once (default: on unless random crops make it invalid)",
    )
    g.add_argument(
        "--cache_latents_to_disk", action="store_true", help="keep the latent cache on disk for later runs"
    )
    g.add_argument(
        "--cache_text_embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode each caption with the frozen text encoder once",
    )
    g.add_argument(
        "--latents_cache_dir", default=None, help="folder for on-disk caches (default: <output_dir>/cache)"
    )
    g.add_argument(
        "--cache_memory_limit_gb",
        type=float,
        default=2.0,
        help="a latent cache larger than this lives on disk (in --latents_cache_dir), read on demand",
    )
    g.add_argument("--cache_batch_size", type=int, default=8, help="batch size while filling the caches")
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="trade compute for memory in the UNet"
    )
    g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--torch_compile", action="store_true", help="compile the UNet with torch.compile")
    g.add_argument(
        "--torch_compile_backend",
        default="inductor",
        help="torch.compile backend (inductor; aot_eager to debug)",
    )
    g.add_argument("--channels_last", action="store_true", help="UNet in channels_last memory format")

    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order, augmentation and noise")
    g.add_argument("--train_batch_size", type=int, default=16, help="batch size per device")
    g.add_argument(
        "--num_train_epochs", type=int, default=100, help="epochs (ignored when --max_train_steps is set)"
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="total optimizer steps")
    g.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step"
    )
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument(
        "--unet_lr",
        type=float,
        default=None,
        help="learning rate of the UNet LoRA (default: --learning_rate)",
    )
    g.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="learning rate of the text-encoder LoRA (default: --learning_rate)",
    )
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="multiply the learning rate by batch size, accumulation and processes",
    )
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
        help="learning-rate schedule",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="warm-up steps")
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR weighting gamma (5.0 recommended)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="offset-noise strength")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="override accelerate's mixed-precision setting",
    )

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None, help="a single validation prompt")
    g.add_argument("--validation_prompts_dir", default=None, help="file with one validation prompt per line")
    g.add_argument(
        "--validation_negative_prompts_dir", default=None, help="file with one negative prompt per line"
    )
    g.add_argument("--num_validation_images", type=int, default=4, help="images per prompt")
    g.add_argument("--validation_epochs", type=int, default=1, help="validate every N epochs")
    g.add_argument("--validation_steps", type=int, default=None, help="validate every N steps instead")
    g.add_argument(
        "--validation_num_inference_steps", type=int, default=30, help="denoising steps for validation"
    )
    g.add_argument(
        "--validation_guidance_scale", type=float, default=7.5, help="guidance scale for validation"
    )
    g.add_argument(
        "--validation_width", type=int, default=None, help="validation image width (default: native size)"
    )
    g.add_argument(
        "--validation_height", type=int, default=None, help="validation image height (default: native size)"
    )

    g = p.add_argument_group("held-out loss and early stopping")
    g.add_argument(
        "--validation_split",
        default=None,
        help="hold images out of training for a held-out loss: a fraction (0.1) or a count (8), chosen from the seed",
    )
    g.add_argument(
        "--validation_data_dir",
        default=None,
        help="a separate held-out set: an imagefolder with metadata.jsonl",
    )
    g.add_argument(
        "--validation_dataset_disk_path",
        default=None,
        help="a separate held-out set saved by create_dataset.py",
    )
    g.add_argument(
        "--validation_loss_timesteps",
        type=int,
        default=8,
        help="fixed timesteps each held-out image is scored at",
    )
    g.add_argument(
        "--validation_loss_steps",
        type=int,
        default=None,
        help="compute the held-out loss every N steps (default: with the validation images, and at the end)",
    )
    g.add_argument(
        "--early_stopping_patience",
        type=int,
        default=None,
        help="stop after N held-out evaluations without improvement (needs a held-out set)",
    )
    g.add_argument(
        "--early_stopping_min_delta", type=float, default=0.0, help="smaller improvements do not count"
    )

    g = p.add_argument_group("outputs")
    g.add_argument(
        "--output_dir", default="sd-model-finetuned-lora", help="where weights, checkpoints and logs go"
    )
    g.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    g.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="read the loss every N steps (reading it waits for the GPU)",
    )
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N steps")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints"
    )
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="a new run into --output_dir may delete the checkpoints an earlier run left there",
    )
    g.add_argument(
        "--force_resume", action="store_true", help="resume even if settings differ from the checkpoint's"
    )
    g.add_argument("--push_to_hub", action="store_true", help="upload the output folder to the Hub")
    g.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub")
    g.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate reads LOCAL_RANK")
    args = p.parse_args(argv)
    return check_args(p, args)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    from sdlora.lora import AdapterSpec

    if not (args.dataset_from_disk or args.train_data_dir or args.dataset_name):
        p.error(
            "no training data: pass --dataset_from_disk (with --dataset_disk_path), --train_data_dir or --dataset_name"
        )
    if args.validation_prompt and args.validation_prompts_dir:
        p.error("pass --validation_prompt or --validation_prompts_dir, not both")
    if args.center_crop and args.random_crop:
        p.error("pass --center_crop or --random_crop, not both (neither: aspect-ratio buckets)")
    for flag in (
        "rank",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "logging_steps",
        "cache_batch_size",
        "validation_epochs",
        "num_validation_images",
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    for flag in ("validation_steps", "checkpoints_total_limit", "conv_rank", "max_train_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    for flag in ("caption_dropout_rate", "caption_tag_dropout_rate", "lora_dropout"):
        if not 0 <= getattr(args, flag) < 1:
            p.error(f"--{flag} must be in [0, 1)")
    held_out = [
        f
        for f in ("validation_split", "validation_data_dir", "validation_dataset_disk_path")
        if getattr(args, f)
    ]
    if len(held_out) > 1:
        p.error(f"pass one of --{', --'.join(held_out)}, not several")
    if args.early_stopping_patience is not None and not held_out:
        p.error(
            "--early_stopping_patience needs a held-out set: pass --validation_split or --validation_data_dir"
        )
    for flag in ("validation_loss_steps", "early_stopping_patience"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.keep_tokens < 0:
        p.error("--keep_tokens must be 0 or more")
    if args.bucket_reso_steps is not None and (args.bucket_reso_steps < 8 or args.bucket_reso_steps % 8):
        p.error("--bucket_reso_steps must be a multiple of 8 (the VAE's downsampling)")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).name
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    args.crop_mode = "center" if args.center_crop else "random" if args.random_crop else "bucket"
    args.adapter_spec = AdapterSpec(
        rank=args.rank,
        alpha=args.lora_alpha,
        layers=args.lora_layers,
        target_modules=tuple(args.lora_target_modules) if args.lora_target_modules else None,
        conv_rank=args.conv_rank,
        conv_alpha=args.conv_alpha,
        use_dora=args.use_dora,
        dropout=args.lora_dropout,
        text_encoder=args.train_text_encoder,
    )
    return args


def load_data(args, base):
    """The dataset and the per-example view of it the trainer draws batches from: every image checked
    and placed in its bucket, the bucket table and caption warnings logged."""
    from sdlora.buckets import BucketSettings, bucket_table
    from sdlora.caption_controls import CaptionControls
    from sdlora.data import Augment, TrainImages, check_captions, check_images, load_train_dataset
    from sdlora.models import size_multiple

    dataset = load_train_dataset(args)
    controls = CaptionControls(
        args.caption_prefix,
        args.caption_suffix,
        args.caption_dropout_rate,
        args.shuffle_caption,
        args.keep_tokens,
        args.caption_separator,
        args.caption_tag_dropout_rate,
    )
    augment = Augment(args.seed, args.random_flip, args.image_interpolation_mode, args.background_rgb)
    images = TrainImages(dataset, args.image_column, dataset[args.caption_column], augment, controls)
    warnings = check_images(images, args.resolution)
    multiple = size_multiple(args.pretrained_model_name_or_path, args.revision)
    # 64 as kohya, but never finer than the UNet's own downsampling allows (16 px for the tiny model).
    args.bucket_reso_steps = args.bucket_reso_steps or max(multiple, min(64, args.resolution // 8))
    args.min_bucket_reso = args.min_bucket_reso or max(args.bucket_reso_steps, args.resolution // 2)
    args.max_bucket_reso = args.max_bucket_reso or args.resolution * 2
    args.bucket_settings = BucketSettings(
        args.crop_mode,
        args.resolution,
        args.bucket_reso_steps,
        args.min_bucket_reso,
        args.max_bucket_reso,
        args.bucket_no_upscale,
    )
    images.place(args.bucket_settings)
    warnings += check_captions([controls.decorate(str(c)) for c in images.raw_captions], base.tokenizer)
    for line in warnings:
        logger.warning(line)
    logger.info("buckets (resolution: images, mean aspect error):")
    for (w, h), n, err in bucket_table(images.placements):
        logger.info("  %dx%d: %d, %.1f%%", w, h, n, 100 * err)
    args.text_cache_blocker = (
        "the text encoder is trained (--train_text_encoder)"
        if args.train_text_encoder
        else "--shuffle_caption / --caption_tag_dropout_rate change captions every epoch (under 2% of a step)"
        if controls.varies_per_epoch
        else None
    )
    return dataset, images


def setup_heldout(args, base, images, latent_cache, device, dtype):
    """(dataset indices to train on, heldout.LossProbes or None): --validation_split holds images of the
    training set out, --validation_data_dir / --validation_dataset_disk_path name a separate set."""
    from sdlora.data import TrainImages, check_images, load_train_dataset
    from sdlora.heldout import (
        MAX_TRAIN_PROBES,
        LossProbes,
        ProbeSet,
        probe_timesteps,
        split_examples,
        train_probe_indices,
    )

    everything = list(range(len(images)))
    if args.validation_split:
        train, held = split_examples(len(images), args.validation_split, args.seed)
        held_out = ProbeSet(images, latent_cache, held)
    elif args.validation_data_dir or args.validation_dataset_disk_path:
        source = argparse.Namespace(
            **{
                **vars(args),
                "dataset_from_disk": bool(args.validation_dataset_disk_path),
                "dataset_disk_path": args.validation_dataset_disk_path,
                "train_data_dir": args.validation_data_dir,
                "max_train_samples": None,
            }
        )
        dataset = load_train_dataset(source)
        val_images = TrainImages(
            dataset, args.image_column, dataset[args.caption_column], images.augment, images.controls
        )
        check_images(val_images, args.resolution)
        val_images.place(args.bucket_settings)
        train, held_out = everything, ProbeSet(val_images, None, list(range(len(val_images))))
    else:
        return everything, None
    timesteps = probe_timesteps(
        args.validation_loss_timesteps, base.noise_scheduler.config.num_train_timesteps
    )
    k = min(len(held_out.indices), len(train), MAX_TRAIN_PROBES)
    sample = ProbeSet(images, latent_cache, train_probe_indices(train, k, args.seed))
    logger.info(
        "held-out loss: %d images, %d training images beside them, timesteps %s",
        len(held_out.indices),
        k,
        timesteps,
    )
    return train, LossProbes(base, held_out, sample, timesteps, args.seed, device, dtype)


def start_tracker(args, accelerator, probes, state: dict, first_step: int):
    """The best-loss tracker as the resumed checkpoint left it (or new), and the loss CSV cut back to match."""
    from sdlora.heldout import CSV_FILE, BestTracker, truncate_csv

    if probes is None:
        return None
    csv = Path(args.output_dir) / CSV_FILE
    if accelerator.is_main_process:
        if first_step:
            truncate_csv(csv, first_step)  # the killed run's later rows are computed again
        else:
            csv.unlink(missing_ok=True)
    if state.get("heldout"):
        return BestTracker.from_state(
            state["heldout"], args.early_stopping_patience, args.early_stopping_min_delta
        )
    return BestTracker(patience=args.early_stopping_patience, min_delta=args.early_stopping_min_delta)


def loss_due(args, step) -> bool:
    """When the held-out loss is computed: --validation_loss_steps, else with the validation images; and at the end."""
    if step.number == args.max_train_steps:
        return True
    if args.validation_loss_steps:
        return step.number % args.validation_loss_steps == 0
    if args.validation_steps:
        return step.number % args.validation_steps == 0
    return step.last_of_epoch and (step.epoch + 1) % args.validation_epochs == 0


def evaluate_heldout(args, accelerator, run: Run, base, step) -> None:
    """Score the held-out and training probes; log them, append the CSV, keep best/ (main process)."""
    from sdlora.heldout import CSV_FILE, append_csv, mean_loss, save_best

    with accelerator.autocast():
        losses = run.probes.evaluate(base.unet, base.text_encoders, run.noise_scheduler)
    val, train_loss = mean_loss(losses["val"]), mean_loss(losses["train"])
    improved = run.tracker.update(step.number, val)  # every process: they all decide to stop together
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    append_csv(output_dir / CSV_FILE, step.number, val, train_loss, losses["val"])
    logs = {
        "val/loss": val,
        "val/train_loss": train_loss,
        **{f"val/loss_t{t}": v for t, v in losses["val"].items()},
    }
    accelerator.log(logs, step=step.number)
    logger.info(
        "held-out loss at step %d: %.5f (training images: %.5f)%s",
        step.number,
        val,
        train_loss,
        " best" if improved else "",
    )
    if improved:
        save_best(
            output_dir, step.number, val, lambda folder: run.write_lora(folder, step.number, step.epoch + 1)
        )


@dataclass
class Run:
    """What the training loop updates, saves and resumes."""

    models: dict[str, torch.nn.Module]  # as prepared by accelerate (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]  # the LoRA weights: all that is trained, clipped and saved
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    conditioning: object
    write_lora: object  # write_lora(folder, step, epoch): the LoRA files with their metadata
    compat: dict
    dtype: torch.dtype
    first_step: int = 0
    last_checkpoint: Path | None = None  # the resume source, then each checkpoint saved
    earlier_checkpoints: list[Path] = field(
        default_factory=list
    )  # an earlier run's, deleted at the first save


def train_step(args, accelerator, run: Run, step, batches) -> torch.Tensor:
    """One optimizer step over the step's micro-batches; returns the summed loss, still on the device."""
    from sdlora.training import diffusion_loss, step_generator, step_seed

    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(len(step.micro_batches)):
        batch = next(batches)
        rank = accelerator.process_index
        trace(rank, "batch", step=step.number, epoch=step.epoch, index=batch["index"].tolist())
        gen = step_generator(args.seed, step.number, micro, rank, accelerator.device)
        # The global stream (LoRA dropout draws from it) restarts at each micro-batch too: exact resume.
        torch.manual_seed(step_seed(args.seed, step.number, micro, rank, stream=1))
        last = micro == len(step.micro_batches) - 1  # gradients are all-reduced on the last micro-batch only
        with contextlib.ExitStack() as stack:
            if not last:
                for model in run.models.values():
                    stack.enter_context(accelerator.no_sync(model))
            stack.enter_context(accelerator.autocast())
            latents, inputs = run.conditioning.latents(batch, gen), run.conditioning.unet_inputs(batch)
            loss = diffusion_loss(
                run.models["unet"], latents, inputs, run.noise_scheduler, args, gen, run.dtype
            )
            accelerator.backward(loss / len(step.micro_batches))
        loss_sum += loss.detach() / len(step.micro_batches)
    accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def save_checkpoint_now(args, accelerator, run: Run, step, resumed_from: Path | None) -> None:
    """checkpoint-<step> from the main process, then prune (never the checkpoint this run resumed from)."""
    import shutil

    from sdlora.checkpoints import prune_checkpoints, save_checkpoint

    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        for (
            old
        ) in run.earlier_checkpoints:  # --overwrite_output_dir: an earlier run's, gone before ours count
            shutil.rmtree(old, ignore_errors=True)
        run.earlier_checkpoints = []
        run.last_checkpoint = save_checkpoint(
            output_dir,
            step.number,
            lambda folder: run.write_lora(folder, step.number, step.epoch + 1),
            run.params,
            run.optimizer,
            run.lr_scheduler,
            accelerator.scaler,
            {"compat": run.compat, "heldout": run.tracker.state_dict() if run.tracker else None},
        )
        prune_checkpoints(output_dir, args.checkpoints_total_limit, protect=resumed_from)
        logger.info("saved %s", run.last_checkpoint)
    accelerator.wait_for_everyone()


def validation_due(args, step) -> bool:
    if step.number == args.max_train_steps:
        return False  # the final validation runs on the saved file instead
    if args.validation_steps:
        return step.number % args.validation_steps == 0
    return step.last_of_epoch and (step.epoch + 1) % args.validation_epochs == 0


def train(args, accelerator, run: Run, base, steps, images, validate, clock) -> None:
    """The loop: each step, then log, checkpoint, stop on request, validate."""
    from tqdm.auto import tqdm

    from sdlora.data import collate
    from sdlora.faults import maybe_kill, stop_requested
    from sdlora.training import StopRequest, agree, check_finite

    todo = steps[run.first_step :]
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=[mb for s in todo for mb in s.micro_batches],
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches, stop, resumed_from = iter(loader), StopRequest(), run.last_checkpoint
    bad_step = torch.full((), -1, device=accelerator.device)  # first non-finite step, kept on the device
    bar = tqdm(
        total=args.max_train_steps,
        initial=run.first_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    for model in run.models.values():
        model.train()
    try:
        for step in todo:
            with clock.phase("train"):
                loss = train_step(args, accelerator, run, step, batches)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step.number, bad_step)
            maybe_kill("step", step.number)  # tests only: a real SIGKILL at a chosen step
            if stop_requested(step.number):  # tests only: what Ctrl-C does, inside a test's process
                stop.signal = "SDLORA_STOP_AT"
            bar.update(1)
            stopping, bad_step = agree(accelerator, stop.signal is not None, bad_step)
            if step.number % args.logging_steps == 0 or step.number == args.max_train_steps:
                check_finite(bad_step, run.last_checkpoint)
                logs = {
                    "loss": accelerator.reduce(loss, "mean").item(),
                    "lr": run.lr_scheduler.get_last_lr()[0],
                }
                bar.set_postfix(step=step.number, **logs)
                accelerator.log(logs, step=step.number)
            run.last_step = step.number
            if run.probes is not None and loss_due(args, step):
                check_finite(bad_step, run.last_checkpoint)
                with clock.phase("validation"):
                    evaluate_heldout(args, accelerator, run, base, step)
            early = run.tracker is not None and run.tracker.should_stop
            if step.number % args.checkpointing_steps == 0 or stopping or early:
                check_finite(bad_step, run.last_checkpoint)
                with clock.phase("save"):
                    save_checkpoint_now(args, accelerator, run, step, resumed_from)
            if early:
                logger.warning(
                    "early stopping after step %d: the held-out loss has not improved for %d evaluations "
                    "(best %.5f at step %d, in %s)",
                    step.number,
                    run.tracker.bad_evals,
                    run.tracker.best_loss,
                    run.tracker.best_step,
                    Path(args.output_dir) / "best",
                )
                break
            if stopping:
                by = f"signal {stop.signal}" if stop.signal is not None else "a signal to another process"
                raise UserError(
                    f"stopped by {by} after step {step.number}; "
                    f"resume with --resume_from_checkpoint latest (saved {run.last_checkpoint})"
                )
            if validation_due(args, step):
                with clock.phase("validation"):
                    validate(step.number)
                for model in run.models.values():
                    model.train()
    finally:
        stop.close()
        bar.close()
    check_finite(bad_step, run.last_checkpoint)


def log_banner(args, accelerator, n_examples: int, first_step: int) -> None:
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** training *****")
    logger.info(
        "  examples = %d, epochs = %d, batch size per device = %d",
        n_examples,
        args.num_train_epochs,
        args.train_batch_size,
    )
    logger.info(
        "  total batch size (parallel x accumulation) = %d, gradient accumulation = %d",
        total_batch,
        args.gradient_accumulation_steps,
    )
    logger.info(
        "  total optimization steps = %d (starting at %d), resolution = %d (%s), precision = %s",
        args.max_train_steps,
        first_step,
        args.resolution,
        args.crop_mode,
        accelerator.mixed_precision,
    )


def lora_writer(args, base, models: dict, run_info):
    """write(folder, step, epoch): both LoRA files, with the metadata as of that step (the one saver of
    checkpoints and final outputs)."""
    from sdlora.lora import save_lora_files
    from sdlora.metadata import lora_metadata

    def write(folder: Path, step: int, epoch: int) -> None:
        save_lora_files(models, base.family, folder, lora_metadata(args, run_info, step, epoch))

    return write


def heldout_card(output_dir: Path, run: Run) -> list[str]:
    """The model card's held-out loss section: the curve, the best step and how to load best/."""
    from sdlora.heldout import BEST_DIR, CSV_FILE, plot_loss_curve

    if run.tracker is None or run.tracker.best_step is None:
        return []
    curve = plot_loss_curve(output_dir / CSV_FILE, output_dir / "validation_loss.png", run.tracker.best_step)
    lines = ["## Held-out loss", ""]
    if curve:
        lines += ["![held-out and training loss](validation_loss.png)", ""]
    lines += [
        f"Lowest held-out loss {run.tracker.best_loss:.5f} at step {run.tracker.best_step} (every evaluation: "
        f"`{CSV_FILE}`). That step's LoRA is in `{BEST_DIR}/`; load it instead of the final weights with "
        f'`pipe.load_lora_weights("{output_dir / BEST_DIR}")`.',
        "",
    ]
    return lines


def save_outputs(args, accelerator, run: Run, base, dataset_desc: str, prompts, negatives, clock) -> None:
    """Final LoRA files, the arguments and the model card, then a validation pass with the saved file
    (whose failure costs nothing) and the upload with --push_to_hub (main process only)."""
    from sdlora.outputs import write_args, write_model_card
    from sdlora.validation import validate_saved_lora

    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    with clock.phase("save"):
        run.write_lora(output_dir, run.last_step, args.num_train_epochs)
        logger.info("saved the LoRA to %s", output_dir)
    write_args(output_dir, args)
    card = heldout_card(output_dir, run)
    write_model_card(output_dir, args, base.family, dataset_desc, prompts, None, card)
    with clock.phase("validation"):
        grid = validate_saved_lora(args, accelerator, prompts, negatives, run.dtype, run.last_step)
    if grid:
        write_model_card(output_dir, args, base.family, dataset_desc, prompts, grid, card)
    if args.push_to_hub:
        from sdlora.hub import upload_folder_or_explain

        upload_folder_or_explain(
            output_dir,
            args.hub_model_id,
            args.hub_token,
            "model",
            ignore_patterns=["checkpoint-*/**", "cache/**", ".*"],
        )


def plan_batches(args, accelerator, images, train_indices: list[int]):
    """The batch plan of the training images (their buckets) and this process's steps; resolves
    --max_train_steps / --num_train_epochs (and --scale_lr)."""
    from sdlora.data import BatchPlan, resolve_schedule

    buckets = [images.placements[i].bucket for i in train_indices]
    plan = BatchPlan(
        train_indices, buckets, args.train_batch_size, args.gradient_accumulation_steps, args.seed
    )
    resolve_schedule(args, plan, accelerator.num_processes)
    return plan, plan.steps(accelerator.process_index, accelerator.num_processes, args.max_train_steps)


def make_run(args, accelerator, base, dataset, images, caches, train_indices, probes, earlier, dtype) -> Run:
    """Adapters, optimizer and schedule, conditioning and the LoRA writer, in a Run resumed from
    --resume_from_checkpoint (with the held-out tracker as that checkpoint left it)."""
    from sdlora.buckets import kohya_bucket_info
    from sdlora.cache import text_hash
    from sdlora.checkpoints import compat_settings, resume
    from sdlora.lora import add_adapters, lora_parameters
    from sdlora.metadata import RunInfo
    from sdlora.training import Conditioning, make_optimization

    models = add_adapters(base, args.adapter_spec, args.seed)
    prepared, optimizer, lr_scheduler = make_optimization(args, accelerator, models)
    encoders = [prepared.get(n, e) for n, e in zip(base.family.text_encoders, base.text_encoders)]
    trained = [images.placements[i] for i in train_indices], [images.raw_captions[i] for i in train_indices]
    run_info = RunInfo(
        base.family,
        len(train_indices),
        kohya_bucket_info(trained[0]),
        images.controls.tag_frequency(trained[1]),
    )
    captions = text_hash([str(c) for c in images.raw_captions])
    run = Run(
        prepared,
        [p for m in models.values() for p in lora_parameters(m)],
        optimizer,
        lr_scheduler,
        base.noise_scheduler,
        Conditioning(base, images, *caches, encoders, accelerator.device, dtype),
        lora_writer(args, base, models, run_info),
        compat_settings(args, accelerator.num_processes, dataset._fingerprint, len(dataset), captions),
        dtype,
        earlier_checkpoints=earlier,
    )
    run.first_step, run.last_checkpoint, state = resume(
        args, models, optimizer, lr_scheduler, accelerator.scaler, run.compat
    )
    run.probes, run.tracker = probes, start_tracker(args, accelerator, probes, state, run.first_step)
    trace(
        accelerator.process_index,
        "setup",
        frozen_dtype=str(base.unet.conv_in.weight.dtype),
        gradient_checkpointing=base.unet.is_gradient_checkpointing,
        lora_dtype=str(run.params[0].dtype),
        optimizer=type(getattr(optimizer, "optimizer", optimizer)).__name__,
    )
    return run


def main(args: argparse.Namespace) -> None:
    from sdlora.cache import build_caches
    from sdlora.checkpoints import earlier_run_checkpoints
    from sdlora.models import load_frozen_model
    from sdlora.timing import Stopwatch
    from sdlora.training import make_accelerator
    from sdlora.validation import make_validator, validation_prompts

    clock = Stopwatch()
    if args.push_to_hub:  # before any work: a long run must not learn at its end that it cannot upload
        from sdlora.hub import check_hub_ready

        args.hub_model_id = check_hub_ready(args.hub_model_id, args.hub_token, "model")
    accelerator, dtype = make_accelerator(args)
    earlier = earlier_run_checkpoints(args)  # refused before any work, unless resuming or overwriting
    prompts, negatives = validation_prompts(args)
    with clock.phase("load"):
        base = load_frozen_model(args, accelerator.device, dtype)
        dataset, images = load_data(args, base)
    with clock.phase("cache"):
        caches = build_caches(args, base, images, dataset._fingerprint, accelerator, dtype)
    images.load_pixels = caches[0] is None
    train_indices, probes = setup_heldout(args, base, images, caches[0], accelerator.device, dtype)
    plan, steps = plan_batches(args, accelerator, images, train_indices)
    run = make_run(args, accelerator, base, dataset, images, caches, train_indices, probes, earlier, dtype)
    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("text2image-lora", config=config)
    log_banner(args, accelerator, len(plan.indices), run.first_step)
    validate = make_validator(args, accelerator, base, dtype, prompts, negatives)
    train(args, accelerator, run, base, steps, images, validate, clock)
    trace(accelerator.process_index, "final", checksum=sum(p.double().sum().item() for p in run.params))
    accelerator.wait_for_everyone()
    desc = f"{len(plan.indices)} image-caption pairs"
    save_outputs(args, accelerator, run, base, desc, prompts, negatives, clock)
    accelerator.end_training()
    logger.info(clock.summary())


if __name__ == "__main__":
    run_cli(main, parse_args())
