"""Train a LoRA on a Stable Diffusion model (SD 1.x, 2.x, SDXL, SD 3.5). Flag names follow the diffusers example script.

    accelerate launch --quiet --cpu train_text_to_image_lora.py --dataset_from_disk \
        --dataset_disk_path datasets/Text2Image_example --max_train_steps 50 --output_dir output/tiny-lora

With no --pretrained_model_name_or_path it trains the built-in tiny model (CPU, seconds). With a real
model (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) it trains at that model's native resolution.
`--config FILE` (TOML, JSON or YAML; keys are the flag names) holds a recipe; flags override it.
Writes <output_dir>/pytorch_lora_weights.safetensors (and a kohya-format copy), checkpoint-<step>/ folders,
validation/step-<N>/ PNGs, TensorBoard logs under <output_dir>/logs, config.toml (re-runs the run),
args.json and a model card.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sdlora.cache import build_caches, text_hash
from sdlora.checkpoints import find_earlier_run
from sdlora.config import TrainConfig, parse_train_config
from sdlora.data import collate, resolve_schedule
from sdlora.errors import run_cli
from sdlora.faults import trace
from sdlora.metadata import lora_metadata
from sdlora.objectives import make_objective, training_scheduler
from sdlora.timing import Stopwatch
from sdlora.training.accelerator import (
    allow_fast_fp32_math,
    check_xformers,
    make_accelerator,
)
from sdlora.training.finish import save_outputs
from sdlora.training.optimization import check_optimizer, optimizer_kind
from sdlora.training.periodic import Periodic
from sdlora.training.run import find_checkpoint, make_run, restore, start_tracker
from sdlora.training.settings import args_json, derive_settings, resolved_config, resume_settings
from sdlora.training.setup import (
    cache_blockers,
    cache_root,
    check_output_folders,
    load_model,
    make_probes,
    plan_batches,
    preprocessing,
)
from sdlora.training.step import train_step
from sdlora.training.subjects import load_data, run_info
from sdlora.validation import Validator, validation_prompts

logger = logging.getLogger("train")


def start(cfg: TrainConfig):
    """The accelerator and everything that must fail before a model loads; returns (accelerator, dtype of the
    frozen weights, the Hub repository to push to)."""
    hub_model_id = None
    if cfg.outputs.push_to_hub:  # a long run must not learn at its end that it cannot upload
        from sdlora.hub import check_hub_ready

        wanted = cfg.outputs.hub_model_id or Path(cfg.outputs.output_dir).name
        hub_model_id = check_hub_ready(wanted, cfg.outputs.hub_token, "model")
    output_dir = Path(cfg.outputs.output_dir)
    accelerator, dtype = make_accelerator(
        cfg.speed.mixed_precision,
        cfg.outputs.report_to,
        output_dir,
        output_dir / cfg.outputs.logging_dir,
        unused_parameters=cfg.adapter.train_text_encoder,
    )
    check_optimizer(optimizer_kind(cfg.optimization, cfg.optimizer))
    if cfg.speed.enable_xformers_memory_efficient_attention:
        check_xformers()
    if cfg.speed.allow_tf32:
        allow_fast_fp32_math(accelerator.device)
    return accelerator, dtype, hub_model_id


def checkpointing(encoder) -> bool:
    """Whether a transformers model has gradient checkpointing on (transformers 5.x renamed the property)."""
    if hasattr(encoder, "is_activation_checkpointing"):
        return encoder.is_activation_checkpointing
    return encoder.is_gradient_checkpointing


def log_banner(cfg: TrainConfig, accelerator, settings, n_examples: int, first_step: int) -> None:
    opt, schedule = cfg.optimization, settings.schedule
    total_batch = opt.train_batch_size * accelerator.num_processes * opt.gradient_accumulation_steps
    logger.info("***** training *****")
    logger.info(
        "  examples = %d, epochs = %d, batch size per device = %d",
        n_examples, schedule.num_train_epochs, opt.train_batch_size,
    )  # fmt: skip
    logger.info(
        "  total batch size (parallel x accumulation) = %d, gradient accumulation = %d",
        total_batch, opt.gradient_accumulation_steps,
    )  # fmt: skip
    logger.info(
        "  total optimization steps = %d (starting at %d), resolution = %d (%s), precision = %s",
        schedule.max_train_steps, first_step, settings.resolution, settings.buckets.mode, accelerator.mixed_precision,
    )  # fmt: skip


def train(cfg: TrainConfig, accelerator, run, images, validate, clock) -> None:
    """The loop: each step, then what is due after it (log, held-out loss, checkpoint, stop, validation)."""
    from tqdm.auto import tqdm

    todo = run.remaining_steps()
    loader = torch.utils.data.DataLoader(
        images,
        batch_sampler=[mb for s in todo for mb in s.micro_batches],
        collate_fn=collate,
        num_workers=cfg.data.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches, total = iter(loader), len(run.steps)
    bar = tqdm(
        total=total, initial=run.first_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    sections = cfg.outputs, cfg.checkpoints, cfg.validation, cfg.heldout
    periodic = Periodic(sections, accelerator, run, validate, clock, bar, total)
    opt = cfg.optimization
    for model in run.models.values():
        model.train()
    try:
        for step in todo:
            with clock.phase("train"):
                loss = train_step(run, step, batches, accelerator, opt.seed, opt.max_grad_norm)
            if periodic.after(step, loss):
                break
    finally:
        bar.close()
        periodic.close()


def trace_setup(rank: int, base, run) -> None:
    """Tests only (SDLORA_TRACE_DIR): what the run was set up with, as the modules themselves say."""
    conv = next(
        p for p in base.denoiser.parameters() if p.dim() == 4
    )  # a UNet's conv_in, SD3's patch embedding
    trace(
        rank,
        "setup",
        frozen_dtype=str(conv.dtype),
        gradient_checkpointing=base.denoiser.is_gradient_checkpointing,
        text_encoder_gradient_checkpointing=[checkpointing(e) for e in base.text_encoders],
        channels_last=conv.is_contiguous(memory_format=torch.channels_last),
        lora_dtype=str(run.params[0].dtype),
        optimizer=type(getattr(run.optimizer, "optimizer", run.optimizer)).__name__,
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups],
    )


def main(cfg: TrainConfig) -> None:
    clock = Stopwatch()
    accelerator, dtype, hub_model_id = start(cfg)
    output_dir, rank, world = (
        Path(cfg.outputs.output_dir),
        accelerator.process_index,
        accelerator.num_processes,
    )
    check_output_folders(cfg.outputs, cfg.cache)
    prompts = validation_prompts(cfg.validation)
    ckpt = cfg.checkpoints
    earlier = find_earlier_run(
        output_dir, cfg.outputs.logging_dir, bool(ckpt.resume_from_checkpoint), ckpt.overwrite_output_dir
    )
    with clock.phase("load"):
        base = load_model(cfg.model, cfg.speed, cfg.adapter.train_text_encoder, accelerator.device, dtype)
        settings = derive_settings(cfg, base, accelerator, hub_model_id)
        dataset, images, split = load_data(cfg, settings, base, accelerator, cfg.optimization.seed)
    plan = plan_batches(cfg.optimization, images, split.train)
    settings = dataclasses.replace(settings, schedule=resolve_schedule(cfg.optimization, plan, world))
    captions = text_hash([str(c) for c in images.raw_captions])
    resolved = resolved_config(cfg, settings)
    compat = resume_settings(resolved, dataset._fingerprint, len(dataset), captions, world, images.layout())
    checkpoint, differing = find_checkpoint(ckpt, output_dir, compat, settings.schedule.max_train_steps)
    scheduler = training_scheduler(base.noise_scheduler, cfg.noise.zero_terminal_snr)
    objective = make_objective(
        scheduler, settings.prediction_type, cfg.objective, cfg.loss, cfg.timesteps, cfg.noise, cfg.flow
    )
    with clock.phase("cache"):
        blockers = cache_blockers(cfg.buckets.random_crop, cfg.adapter.train_text_encoder, images)
        keys = dataset._fingerprint, preprocessing(images, settings.buckets)
        caches = build_caches(
            cfg.cache, cache_root(cfg.outputs, cfg.cache), base, images, *keys, blockers, accelerator, dtype
        )
    images.load_pixels = caches[0] is None
    info = run_info(images, split.train)
    describe = lambda step, epoch: lora_metadata(cfg, settings, info, step, epoch)  # noqa: E731
    steps = plan.steps(rank, world, settings.schedule.max_train_steps)
    sections = cfg.optimization, cfg.optimizer, cfg.ema, cfg.speed
    run = make_run(
        *sections, accelerator, base, settings, images, caches, objective, describe, compat, steps, dtype
    )
    state = restore(run, checkpoint, differing, accelerator, cfg.optimization)
    run.probes = make_probes(
        cfg.heldout,
        cfg.optimization.seed,
        split,
        images,
        caches[0],
        base,
        objective,
        accelerator.device,
        dtype,
    )
    run.tracker = start_tracker(
        cfg.heldout, output_dir, run.probes, state, run.first_step, accelerator.is_main_process
    )
    run.earlier = earlier
    trace_setup(rank, base, run)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "text2image-lora",
            config={k: v for k, v in args_json(resolved).items() if isinstance(v, int | float | str | bool)},
        )
    log_banner(cfg, accelerator, settings, len(plan.indices), run.first_step)
    sampling = settings.prediction_type, cfg.noise.zero_terminal_snr
    validator = Validator(
        cfg.validation,
        prompts,
        cfg.optimization.seed,
        output_dir,
        accelerator,
        base,
        dtype,
        *sampling,
        cfg.model.revision,
    )
    train(cfg, accelerator, run, images, validator, clock)
    trace(rank, "final", checksum=sum(p.double().sum().item() for p in run.params))
    accelerator.wait_for_everyone()
    save_outputs(
        cfg, settings, accelerator, run, validator, f"{len(plan.indices)} image-caption pairs", clock
    )
    accelerator.end_training()
    logger.info(clock.summary())


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The configuration from the command line and --config FILE (sdlora/config/train.py has every flag)."""
    return parse_train_config(__doc__, argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
