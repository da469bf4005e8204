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
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.errors import UserError, run_cli

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Hub id or local diffusers folder (default: built-in tiny model)",
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
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
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
    g.add_argument("--cache_batch_size", type=int, default=8, help="batch size while filling the caches")
    g.add_argument(
        "--gradient_checkpointing", action="store_true", help="trade compute for memory in the UNet"
    )
    g.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--torch_compile", action="store_true", help="compile the UNet with torch.compile")
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
        "--force_resume", action="store_true", help="resume even if settings differ from the checkpoint's"
    )
    g.add_argument("--push_to_hub", action="store_true", help="upload the output folder to the Hub")
    g.add_argument("--hub_model_id", default=None, help="Hub repository for --push_to_hub")
    g.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate reads LOCAL_RANK")
    args = p.parse_args(argv)
    return check_args(p, args)


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if not (args.dataset_from_disk or args.train_data_dir or args.dataset_name):
        p.error(
            "no training data: pass --dataset_from_disk (with --dataset_disk_path), --train_data_dir or --dataset_name"
        )
    if args.validation_prompt and args.validation_prompts_dir:
        p.error("pass --validation_prompt or --validation_prompts_dir, not both")
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
    if args.validation_steps is not None and args.validation_steps < 1:
        p.error("--validation_steps must be at least 1")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    return args


def load_data(args, base):
    """The dataset and the per-example view of it the trainer draws batches from; every image checked."""
    from sdlora.data import TrainImages, check_images, load_train_dataset

    dataset = load_train_dataset(args)
    images = TrainImages(dataset, args, base.tokenizer)
    for line in check_images(images):
        logger.warning(line)
    return dataset, images


@dataclass
class Run:
    """What the training loop updates, saves and resumes."""

    unet: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]  # the LoRA weights: all that is trained, clipped and saved
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    conditioning: object
    compat: dict
    first_step: int = 0
    last_checkpoint: Path | None = None  # the resume source, then each checkpoint saved


def train_step(args, accelerator, run: Run, step, batches) -> torch.Tensor:
    """One optimizer step over the step's micro-batches; returns the summed loss, still on the device."""
    from sdlora.training import diffusion_loss, step_generator

    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(len(step.micro_batches)):
        batch = next(batches)
        gen = step_generator(args.seed, step.number, micro, accelerator.process_index, accelerator.device)
        latents, text = run.conditioning.latents(batch, gen), run.conditioning.text(batch)
        last = micro == len(step.micro_batches) - 1  # gradients are all-reduced on the last micro-batch only
        with contextlib.nullcontext() if last else accelerator.no_sync(run.unet), accelerator.autocast():
            loss = diffusion_loss(run.unet, latents, text, run.noise_scheduler, args, gen)
            accelerator.backward(loss / len(step.micro_batches))
        loss_sum += loss.detach() / len(step.micro_batches)
    accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum


def save_checkpoint_now(args, accelerator, run: Run, step: int, resumed_from: Path | None) -> None:
    """checkpoint-<step> from the main process, then prune (never the checkpoint this run resumed from)."""
    from sdlora.checkpoints import prune_checkpoints, save_checkpoint

    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        model = accelerator.unwrap_model(run.unet)
        run.last_checkpoint = save_checkpoint(
            output_dir, step, model, run.optimizer, run.lr_scheduler, accelerator.scaler, run.compat
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


def train(args, accelerator, run: Run, steps, images, validate, clock) -> None:
    """The loop: each step, then log, checkpoint, stop on request, validate."""
    from tqdm.auto import tqdm

    from sdlora.data import collate
    from sdlora.faults import maybe_kill
    from sdlora.training import StopRequest, check_finite

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
    run.unet.train()
    for step in todo:
        with clock.phase("train"):
            loss = train_step(args, accelerator, run, step, batches)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step.number, bad_step)
        maybe_kill("step", step.number)  # tests only: a real SIGKILL at a chosen step
        bar.update(1)
        if step.number % args.logging_steps == 0 or step.number == args.max_train_steps:
            check_finite(bad_step, run.last_checkpoint)
            logs = {"loss": accelerator.reduce(loss, "mean").item(), "lr": run.lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(step=step.number, **logs)
            accelerator.log(logs, step=step.number)
        if step.number % args.checkpointing_steps == 0 or stop.signal is not None:
            check_finite(bad_step, run.last_checkpoint)
            with clock.phase("save"):
                save_checkpoint_now(args, accelerator, run, step.number, resumed_from)
        if stop.signal is not None:
            raise UserError(
                f"stopped by signal {stop.signal} after step {step.number}; "
                f"resume with --resume_from_checkpoint latest (saved {run.last_checkpoint})"
            )
        if validation_due(args, step):
            with clock.phase("validation"):
                validate(step.number)
            run.unet.train()
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
        "  total optimization steps = %d (starting at %d), resolution = %d, precision = %s",
        args.max_train_steps,
        first_step,
        args.resolution,
        accelerator.mixed_precision,
    )


def main(args: argparse.Namespace) -> None:
    from sdlora.cache import build_caches
    from sdlora.checkpoints import compat_settings, resume
    from sdlora.data import plan_training
    from sdlora.lora import lora_parameters
    from sdlora.models import load_for_lora_training
    from sdlora.outputs import save_outputs
    from sdlora.timing import Stopwatch
    from sdlora.training import Conditioning, make_accelerator, make_optimization
    from sdlora.validation import make_validator, validation_prompts

    clock = Stopwatch()
    accelerator, dtype = make_accelerator(args)
    device = accelerator.device
    prompts, negatives = validation_prompts(args)
    with clock.phase("load"):
        base = load_for_lora_training(args, device, dtype)
        dataset, images = load_data(args, base)
    with clock.phase("cache"):
        latent_cache, text_cache = build_caches(args, base, dataset, images, device, dtype)
    images.load_pixels = latent_cache is None
    steps = plan_training(args, len(images), accelerator.process_index, accelerator.num_processes)
    unet, optimizer, lr_scheduler = make_optimization(args, accelerator, base.unet)
    conditioning = Conditioning(base, images.captions, latent_cache, text_cache, device, dtype)
    run = Run(
        unet,
        lora_parameters(base.unet),
        optimizer,
        lr_scheduler,
        base.noise_scheduler,
        conditioning,
        compat_settings(args, accelerator.num_processes, dataset),
    )
    run.first_step, run.last_checkpoint = resume(
        args, accelerator.unwrap_model(unet), optimizer, lr_scheduler, accelerator.scaler, run.compat
    )
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "text2image-lora",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        )
    log_banner(args, accelerator, len(images), run.first_step)
    validate = make_validator(args, accelerator, base, unet, dtype, prompts, negatives)
    train(args, accelerator, run, steps, images, validate, clock)
    accelerator.wait_for_everyone()
    save_outputs(
        args, accelerator, unet, f"{len(images)} image-caption pairs", prompts, negatives, dtype, clock
    )
    accelerator.end_training()
    logger.info(clock.summary())


if __name__ == "__main__":
    run_cli(main, parse_args())
