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
import functools
import logging
import math
import signal
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
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    return args


def set_up(args):
    """Accelerator, logging and the checks that must fail before any model is loaded."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sdlora.images import parse_color
    from sdlora.training import check_8bit_adam, weight_dtype_for

    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    weight_dtype = weight_dtype_for(accelerator.mixed_precision, accelerator.device)
    args.mixed_precision = accelerator.mixed_precision  # recorded in args.json and the model card
    if args.use_8bit_adam:
        check_8bit_adam()
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed; drop the flag (PyTorch's SDPA is used)"
            ) from None
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.background_rgb = parse_color(args.background)
    return accelerator, weight_dtype


def load_model(args, accelerator, weight_dtype):
    """Frozen base model in the half type (if any), LoRA adapter in fp32 on the UNet."""
    from sdlora.lora import add_lora, lora_parameters
    from sdlora.models import load_base_model, native_resolution, resolve_model

    args.pretrained_model_name_or_path = resolve_model(args.pretrained_model_name_or_path)
    base = load_base_model(args.pretrained_model_name_or_path, args.revision, args.variant)
    args.resolution = args.resolution or native_resolution(args.pretrained_model_name_or_path, args.revision)
    if args.prediction_type:
        base.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    for module in (base.unet, base.vae, base.text_encoder):
        # (a dtype argument, even float32, makes diffusers warn about casting; pass it only when casting)
        module.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    torch.manual_seed(args.seed)  # the adapter's initial weights
    add_lora(base.unet, args.rank, args.lora_alpha)
    for param in lora_parameters(base.unet):
        param.data = param.data.float()  # fp32 LoRA weights (and so fp32 optimizer state) under any precision
    if args.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        base.unet.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        base.unet.to(memory_format=torch.channels_last)
    return base


def load_data(args, accelerator, base):
    """The dataset and the per-example view of it the trainer draws batches from."""
    from sdlora.data import TrainImages, check_images, load_train_dataset

    dataset = load_train_dataset(args)
    images = TrainImages(dataset, args, base.tokenizer)
    for line in check_images(images):
        logger.warning(line)
    return dataset, images


def build_caches(args, accelerator, base, dataset, images, weight_dtype):
    """Latent and text-embedding caches where they are valid (see sdlora.cache)."""
    from sdlora.cache import LatentCache, TextCache, latent_cache_key, text_cache_key
    from sdlora.data import has_crop_slack
    from sdlora.training import encode_prompts

    root = (
        Path(args.latents_cache_dir or Path(args.output_dir) / "cache")
        if args.cache_latents_to_disk
        else None
    )
    latent_cache = text_cache = None
    if args.cache_latents is not False:
        if not args.center_crop and has_crop_slack(dataset, args.image_column):
            (logger.warning if args.cache_latents else logger.info)(
                "latents not cached: random crops of non-square images differ every epoch (pass --center_crop to cache)"
            )
        else:
            key = latent_cache_key(dataset._fingerprint, base.vae, args, weight_dtype)
            folder = root / f"latents-{key}" if root else None
            latent_cache = LatentCache.build(images, base.vae, args, accelerator.device, weight_dtype, folder)
            base.vae.to("cpu")  # not needed on the accelerator again until validation
    if args.cache_text_embeddings:
        key = text_cache_key(dataset._fingerprint, base.text_encoder, base.tokenizer, weight_dtype)
        folder = root / f"text-{key}" if root else None
        encode = functools.partial(
            encode_prompts, base.tokenizer, base.text_encoder, device=accelerator.device
        )
        text_cache = TextCache.build(images.captions, encode, args, folder)
    return latent_cache, text_cache


def plan_training(args, accelerator, n_examples: int):
    """Total steps and every step's batches, like the diffusers example's epoch/step arithmetic."""
    from sdlora.data import plan_steps, steps_per_epoch

    per_epoch = steps_per_epoch(
        n_examples, args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / per_epoch)
    if args.scale_lr:
        args.learning_rate *= (
            args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )
    return plan_steps(
        n_examples, args, accelerator.process_index, accelerator.num_processes, args.max_train_steps
    )


def make_optimization(args, accelerator, base):
    from sdlora.lora import lora_parameters
    from sdlora.training import make_lr_scheduler, make_optimizer

    optimizer = make_optimizer(lora_parameters(base.unet), args, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, args, args.max_train_steps)
    unet, optimizer = accelerator.prepare(base.unet, optimizer)
    if args.torch_compile:
        unet = torch.compile(unet)
    return unet, optimizer, lr_scheduler


def compat_settings(args, accelerator, dataset) -> dict:
    """The settings a resumed run must share with its checkpoint to continue the same run."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "dataset": dataset._fingerprint,
        "examples": len(dataset),
        "resolution": args.resolution,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "seed": args.seed,
    }


def maybe_resume(args, accelerator, unet, optimizer, lr_scheduler, compat) -> tuple[int, Path | None]:
    """Restore the checkpoint named by --resume_from_checkpoint; return (steps done, its folder)."""
    from sdlora.checkpoints import check_compatible, load_checkpoint, read_state, resolve_resume

    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        if args.resume_from_checkpoint:
            logger.info("no checkpoint in %s yet; starting a new run", args.output_dir)
        return 0, None
    check_compatible(
        read_state(path)["compat"], compat, path, args.force_resume
    )  # before loading mismatched weights
    saved = load_checkpoint(path, accelerator.unwrap_model(unet), optimizer, lr_scheduler, accelerator.scaler)
    logger.info("resumed from %s at step %d", path, saved["global_step"])
    return saved["global_step"], path


def validation_prompts(args) -> tuple[list[str], list[str] | None]:
    from sdlora.captions import read_validation_prompts

    prompts = [args.validation_prompt] if args.validation_prompt else []
    if args.validation_prompts_dir:
        prompts = read_validation_prompts(args.validation_prompts_dir)
    negatives = None
    if args.validation_negative_prompts_dir:
        negatives = read_validation_prompts(args.validation_negative_prompts_dir)
        negatives = (negatives * len(prompts))[: len(prompts)]
    return prompts, negatives


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def check_finite(bad_step: torch.Tensor, last_checkpoint) -> None:
    step = int(bad_step.item())
    if step >= 0:
        where = (
            f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        )
        raise UserError(
            f"loss became NaN or infinite at step {step}; nothing more was saved ({where}); "
            "lower --learning_rate or use --mixed_precision bf16/no"
        )


def train(
    args,
    accelerator,
    base,
    unet,
    optimizer,
    lr_scheduler,
    steps,
    images,
    conditioning,
    compat,
    first_step,
    resumed_from,
    validate,
    clock,
):
    """The training loop: each step's micro-batches, then clip, update, log, checkpoint, validate."""
    from tqdm.auto import tqdm

    from sdlora.checkpoints import prune_checkpoints, save_checkpoint
    from sdlora.data import collate
    from sdlora.faults import maybe_kill
    from sdlora.training import diffusion_loss, step_generator

    output_dir = Path(args.output_dir)
    todo = steps[first_step:]
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=[mb for s in todo for mb in s.micro_batches],
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches = iter(loader)
    stop = StopRequest()
    bad_step = torch.full((), -1, device=accelerator.device)
    last_checkpoint = resumed_from
    bar = tqdm(
        total=args.max_train_steps,
        initial=first_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    unet.train()
    for step in todo:
        with clock.phase("train"):
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro, _ in enumerate(step.micro_batches):
                batch = next(batches)
                gen = step_generator(
                    args.seed, step.number, micro, accelerator.process_index, accelerator.device
                )
                latents, text = conditioning.latents(batch, gen), conditioning.text(batch)
                sync = micro == len(step.micro_batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
                    loss = diffusion_loss(unet, latents, text, base.noise_scheduler, args, gen) / len(
                        step.micro_batches
                    )
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum), step.number, bad_step)
        maybe_kill("step", step.number)  # tests only: a real SIGKILL at a chosen step
        bar.update(1)
        if step.number % args.logging_steps == 0 or step.number == args.max_train_steps:
            check_finite(bad_step, last_checkpoint)
            logs = {"loss": accelerator.reduce(loss_sum, "mean").item(), "lr": lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(step=step.number, **logs)
            accelerator.log(logs, step=step.number)
        stopping = stop.signal is not None
        if step.number % args.checkpointing_steps == 0 or stopping:
            check_finite(bad_step, last_checkpoint)
            if accelerator.is_main_process:
                with clock.phase("save"):
                    last_checkpoint = save_checkpoint(
                        output_dir,
                        step.number,
                        accelerator.unwrap_model(unet),
                        optimizer,
                        lr_scheduler,
                        accelerator.scaler,
                        compat,
                    )
                    prune_checkpoints(output_dir, args.checkpoints_total_limit, protect=resumed_from)
                logger.info("saved %s", last_checkpoint)
            accelerator.wait_for_everyone()
        if stopping:
            raise UserError(
                f"stopped by signal {stop.signal} after step {step.number}; "
                f"resume with --resume_from_checkpoint latest (saved {last_checkpoint})"
            )
        due = (
            (step.number % args.validation_steps == 0)
            if args.validation_steps
            else (step.last_of_epoch and (step.epoch + 1) % args.validation_epochs == 0)
        )
        if due and step.number != args.max_train_steps:
            with clock.phase("validation"):
                validate(step.number)
            unet.train()
    bar.close()
    check_finite(bad_step, last_checkpoint)


def make_validator(args, accelerator, base, unet, weight_dtype, prompts, negatives):
    """validate(step): validation images from the in-memory modules, on the main process only."""
    from sdlora.validation import pipeline_from_modules, run_validation

    def validate(step: int) -> None:
        if not prompts or not accelerator.is_main_process:
            return
        base.vae.to(accelerator.device)
        pipe = pipeline_from_modules(
            args.pretrained_model_name_or_path,
            base,
            accelerator.unwrap_model(unet),
            accelerator.device,
            args.revision,
        )
        logger.info(
            "validation at step %d: %d prompts x %d images", step, len(prompts), args.num_validation_images
        )
        run_validation(
            pipe, prompts, negatives, args, step, Path(args.output_dir), accelerator.trackers, weight_dtype
        )

    return validate


def save_outputs(args, accelerator, unet, dataset_desc, prompts, negatives, weight_dtype) -> None:
    """Final LoRA weights, a validation pass with the saved file, the model card, the arguments."""
    from sdlora.generation import slugify
    from sdlora.lora import save_lora
    from sdlora.model_card import write_args, write_model_card
    from sdlora.validation import pipeline_with_saved_lora, run_validation

    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    path = save_lora(accelerator.unwrap_model(unet), output_dir)
    logger.info("saved %s", path)
    grid = None
    if prompts:
        pipe = pipeline_with_saved_lora(
            args.pretrained_model_name_or_path,
            output_dir,
            weight_dtype,
            accelerator.device,
            args.revision,
            args.variant,
        )
        if run_validation(
            pipe,
            prompts,
            negatives,
            args,
            args.max_train_steps,
            output_dir,
            accelerator.trackers,
            weight_dtype,
        ):
            grid = f"validation/step-{args.max_train_steps}/00-{slugify(prompts[0])}_0.png"
    write_args(output_dir, args)
    write_model_card(output_dir, args, dataset_desc, prompts, grid)
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(
            args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token
        ).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            token=args.hub_token,
            ignore_patterns=["checkpoint-*/**", "cache/**", ".*"],
        )


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
    from sdlora.timing import Stopwatch
    from sdlora.training import Conditioning

    clock = Stopwatch()
    accelerator, weight_dtype = set_up(args)
    prompts, negatives = validation_prompts(args)
    with clock.phase("load"):
        base = load_model(args, accelerator, weight_dtype)
        dataset, images = load_data(args, accelerator, base)
    with clock.phase("cache"):
        latent_cache, text_cache = build_caches(args, accelerator, base, dataset, images, weight_dtype)
    images.load_pixels = latent_cache is None
    conditioning = Conditioning(
        base, images.captions, latent_cache, text_cache, accelerator.device, weight_dtype
    )
    steps = plan_training(args, accelerator, len(images))
    unet, optimizer, lr_scheduler = make_optimization(args, accelerator, base)
    compat = compat_settings(args, accelerator, dataset)
    first_step, resumed_from = maybe_resume(args, accelerator, unet, optimizer, lr_scheduler, compat)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "text2image-lora",
            config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        )
    log_banner(args, accelerator, len(images), first_step)
    validate = make_validator(args, accelerator, base, unet, weight_dtype, prompts, negatives)
    train(
        args,
        accelerator,
        base,
        unet,
        optimizer,
        lr_scheduler,
        steps,
        images,
        conditioning,
        compat,
        first_step,
        resumed_from,
        validate,
        clock,
    )
    accelerator.wait_for_everyone()
    with clock.phase("save"):
        save_outputs(
            args, accelerator, unet, f"{len(images)} image-caption pairs", prompts, negatives, weight_dtype
        )
    accelerator.end_training()
    logger.info(clock.summary())


if __name__ == "__main__":
    run_cli(main, parse_args())
