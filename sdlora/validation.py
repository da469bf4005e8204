"""Validation images during training: seeded, from the modules in memory, to PNG and TensorBoard."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_directory
from .generation import generate, inference_scheduler, load_pipeline, make_grid, slugify
from .heldout import evaluating
from .layout import VALIDATION_DIR

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
    base, denoiser, text_encoders, device, prediction_type: str, revision: str | None = None
):
    """The family's pipeline around the training modules (no weights reloaded from disk), sampling with
    the prediction type the LoRA is trained for."""
    components = base.pipeline_components(denoiser)
    components.update(zip(base.family.text_encoders, text_encoders))
    pipe = base.family.pipeline_class(
        **components,
        scheduler=inference_scheduler(base.name, prediction_type, revision),
        **base.family.pipeline_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def run_validation(
    pipe, prompts, negatives, validation, seed: int, step: int, output_dir: Path, trackers, dtype
) -> bool:
    """Generate validation.num_validation_images per prompt (validation: config.train.ValidationConfig) with
    every module in eval mode (LoRA dropout off, so the images are those the saved file gives); save the PNGs
    (the step's folder replaced whole) and one grid per prompt to TensorBoard.

    A failure is logged and reported as False: validation must never end a training run.
    """
    autocast = (
        torch.autocast(pipe.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    try:
        grids = []
        with atomic_directory(output_dir / VALIDATION_DIR / f"step-{step}", overwrite=True) as folder:
            for i, prompt in enumerate(prompts):
                with autocast, evaluating(modules):
                    images = generate(
                        pipe,
                        prompt,
                        negatives[i] if negatives else None,
                        validation.num_validation_images,
                        validation.validation_num_inference_steps,
                        validation.validation_guidance_scale,
                        seed,
                        height=validation.validation_height,
                        width=validation.validation_width,
                    )
                for j, image in enumerate(images):
                    image.save(folder / f"{i:02d}-{slugify(prompt)}_{j}.png")
                grids.append((f"validation/{i:02d}-{slugify(prompt)}", prompt, np.asarray(make_grid(images))))
        for tag, prompt, grid in grids:
            for tracker in trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_image(tag, grid, step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({tag: wandb.Image(grid, caption=prompt)}, step=step)
        return True
    except Exception as e:  # noqa: BLE001 - reported and training goes on, by design
        logger.error("validation at step %d failed (%s: %s); training continues", step, type(e).__name__, e)
        return False


def validation_prompts(validation) -> tuple[list[str], list[str] | None]:
    """Prompts from --validation_prompts_dir (a file) or --validation_prompt; negatives cycled to match."""
    from .captions import read_validation_prompts

    prompts = [validation.validation_prompt] if validation.validation_prompt else []
    if validation.validation_prompts_dir:
        prompts = read_validation_prompts(validation.validation_prompts_dir)
    negatives = None
    if validation.validation_negative_prompts_dir:
        negatives = read_validation_prompts(validation.validation_negative_prompts_dir)
        negatives = (negatives * len(prompts))[: len(prompts)]
    return prompts, negatives


class Validator:
    """Validation images of a run (main process only): from the modules in memory during training, and at
    the end from the saved file reloaded into a fresh pipeline, as users will load it."""

    def __init__(
        self,
        validation,
        prompts,
        seed: int,
        output_dir: Path,
        accelerator,
        base,
        dtype,
        prediction_type,
        revision,
    ):
        self.validation, self.seed, self.output_dir = validation, seed, output_dir
        self.prompts, self.negatives = prompts  # validation_prompts(validation), read before any work
        self.accelerator, self.base, self.dtype = accelerator, base, dtype
        self.prediction_type, self.revision = prediction_type, revision

    def __call__(self, step: int) -> None:
        if not self.prompts or not self.accelerator.is_main_process:
            return
        # base's own modules are the ones training updates, whatever DDP or torch.compile wrapped around them.
        base, device = self.base, self.accelerator.device
        logger.info(
            "validation at step %d: %d prompts x %d images",
            step,
            len(self.prompts),
            self.validation.num_validation_images,
        )
        with borrowed([base.vae, *base.text_encoders], device):
            try:
                pipe = pipeline_from_modules(
                    base, base.denoiser, base.text_encoders, device, self.prediction_type, self.revision
                )
            except Exception as e:  # noqa: BLE001 - validation must never end a training run
                logger.error(
                    "validation at step %d failed (%s: %s); training continues", step, type(e).__name__, e
                )
                return
            self._run(pipe, step)

    def _run(self, pipe, step: int) -> bool:
        return run_validation(
            pipe, self.prompts, self.negatives, self.validation, self.seed, step, self.output_dir,
            self.accelerator.trackers, self.dtype,
        )  # fmt: skip

    def final(self, model: str, variant: str | None, step: int) -> str | None:
        """The last validation, from the saved file; returns a sample image path. Any failure is logged and
        None returned: the outputs are saved whatever happens here."""
        if not self.prompts:
            return None
        try:
            # The same loader inference uses: the file users will load, checked against the model and reloaded.
            pipe, _ = load_pipeline(
                model, self.output_dir, self.accelerator.device, self.dtype, self.revision, variant
            )
        except Exception as e:  # noqa: BLE001 - a failed validation never costs outputs
            logger.error("final validation failed (%s: %s); the outputs are saved", type(e).__name__, e)
            return None
        if self._run(pipe, step):
            return f"{VALIDATION_DIR}/step-{step}/00-{slugify(self.prompts[0])}_0.png"
        return None
