"""Validation images during training: seeded, from the modules in memory, to PNG and TensorBoard."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from .generation import generate, inference_scheduler, load_pipeline, make_grid, slugify

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def borrowed(modules: list[torch.nn.Module], device):
    """Move modules to `device` for the block and back where each was: the frozen encoders live off the
    accelerator once the caches are built, and come back only for validation."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def pipeline_from_modules(
    base, unet, text_encoders, device, prediction_type: str, revision: str | None = None
):
    """The family's pipeline around the training modules (no weights reloaded from disk), sampling with
    the prediction type the LoRA is trained for."""
    components = base.pipeline_components(unet)
    components.update(zip(base.family.text_encoders, text_encoders))
    pipe = base.family.pipeline_class(
        **components,
        scheduler=inference_scheduler(base.name, prediction_type, revision),
        **base.family.pipeline_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_validation(
    pipe, prompts, negatives, args, step: int, output_dir: Path, trackers, autocast_dtype
) -> bool:
    """Generate args.num_validation_images per prompt; save PNGs and one grid per prompt to TensorBoard.

    A failure is logged and reported as False: validation must never end a training run.
    """
    folder = output_dir / "validation" / f"step-{step}"
    device = pipe.device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype != torch.float32
        else contextlib.nullcontext()
    )
    try:
        for i, prompt in enumerate(prompts):
            with autocast:
                images = generate(
                    pipe,
                    prompt,
                    negatives[i] if negatives else None,
                    args.num_validation_images,
                    args.validation_num_inference_steps,
                    args.validation_guidance_scale,
                    args.seed,
                    height=args.validation_height,
                    width=args.validation_width,
                )
            slug = slugify(prompt)
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(images):
                image.save(folder / f"{i:02d}-{slug}_{j}.png")
            grid = np.asarray(make_grid(images))
            for tracker in trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image(f"validation/{i:02d}-{slug}", grid, step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({f"validation/{i:02d}-{slug}": wandb.Image(grid, caption=prompt)}, step=step)
        return True
    except Exception as e:  # noqa: BLE001 - reported and training goes on, by design
        logger.error("validation at step %d failed (%s: %s); training continues", step, type(e).__name__, e)
        return False


def validation_prompts(args) -> tuple[list[str], list[str] | None]:
    """Prompts from --validation_prompts_dir (a file) or --validation_prompt; negatives cycled to match."""
    from .captions import read_validation_prompts

    prompts = [args.validation_prompt] if args.validation_prompt else []
    if args.validation_prompts_dir:
        prompts = read_validation_prompts(args.validation_prompts_dir)
    negatives = None
    if args.validation_negative_prompts_dir:
        negatives = read_validation_prompts(args.validation_negative_prompts_dir)
        negatives = (negatives * len(prompts))[: len(prompts)]
    return prompts, negatives


def make_validator(args, accelerator, base, weight_dtype, prompts, negatives):
    """validate(step): validation images from the in-memory modules, on the main process only."""

    def validate(step: int) -> None:
        if not prompts or not accelerator.is_main_process:
            return
        # base's own modules are the ones training updates, whatever DDP or torch.compile wrapped around them.
        unet, encoders = base.unet, base.text_encoders
        logger.info(
            "validation at step %d: %d prompts x %d images", step, len(prompts), args.num_validation_images
        )
        with borrowed([base.vae, *encoders], accelerator.device):
            try:
                pipe = pipeline_from_modules(
                    base, unet, encoders, accelerator.device, args.prediction_type, args.revision
                )
            except Exception as e:  # noqa: BLE001 - validation must never end a training run
                logger.error(
                    "validation at step %d failed (%s: %s); training continues", step, type(e).__name__, e
                )
                return
            run_validation(
                pipe,
                prompts,
                negatives,
                args,
                step,
                Path(args.output_dir),
                accelerator.trackers,
                weight_dtype,
            )

    return validate


def validate_saved_lora(args, accelerator, prompts, negatives, weight_dtype, step: int) -> str | None:
    """The last validation, from the saved file reloaded into a fresh pipeline; returns a sample image path.
    Any failure is logged and None returned: the outputs are saved whatever happens here."""
    if not prompts:
        return None
    output_dir = Path(args.output_dir)
    try:
        # The same loader inference uses: the file users will load, checked against the model and reloaded.
        pipe, _ = load_pipeline(
            args.pretrained_model_name_or_path,
            output_dir,
            accelerator.device,
            weight_dtype,
            args.revision,
            args.variant,
        )
    except Exception as e:  # noqa: BLE001 - a failed validation never costs outputs
        logger.error("final validation failed (%s: %s); the outputs are saved", type(e).__name__, e)
        return None
    if run_validation(pipe, prompts, negatives, args, step, output_dir, accelerator.trackers, weight_dtype):
        return f"validation/step-{step}/00-{slugify(prompts[0])}_0.png"
    return None
