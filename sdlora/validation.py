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
from .prompts import Prompt, parse_line, read_prompt_file, with_negatives

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
    base,
    denoiser,
    text_encoders,
    device,
    prediction_type: str,
    revision: str | None = None,
    zero_snr: bool = False,
):
    """The family's pipeline around the training modules (no weights reloaded from disk), sampling with
    the prediction type (and zero terminal SNR) the LoRA is trained for."""
    components = base.pipeline_components(denoiser)
    components.update(zip(base.family.text_encoders, text_encoders))
    pipe = base.family.pipeline_class(
        **components,
        scheduler=inference_scheduler(base.name, prediction_type, revision, zero_snr),
        **base.family.pipeline_kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _given(value, default):
    return default if value is None else value


def run_validation(
    pipe, prompts: list[Prompt], validation, seed: int, step: int, output_dir: Path, trackers, dtype
) -> bool:
    """Generate validation.num_validation_images per prompt (validation: config.train.ValidationConfig; a
    prompt's own settings, kohya's --n --w --h --d --l --s, over the flags') with
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
                        prompt.text,
                        prompt.negative,
                        validation.num_validation_images,
                        prompt.steps or validation.validation_num_inference_steps,
                        _given(prompt.guidance_scale, validation.validation_guidance_scale),
                        _given(prompt.seed, seed),
                        height=prompt.height or validation.validation_height,
                        width=prompt.width or validation.validation_width,
                    )
                stem = f"{i:02d}-{slugify(prompt.text)}"
                for j, image in enumerate(images):
                    image.save(folder / f"{stem}_{j}.png")
                grids.append((f"validation/{stem}", prompt.text, np.asarray(make_grid(images))))
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


def validation_prompts(validation) -> list[Prompt]:
    """Prompts from --validation_prompts_dir (a file: lines with kohya's options, JSON or TOML) or
    --validation_prompt (its options too); --validation_negative_prompts_dir's lines where a prompt sets no
    negative of its own, cycled to match."""
    from .captions import read_validation_prompts

    prompts = (
        [parse_line(validation.validation_prompt, "--validation_prompt")]
        if validation.validation_prompt
        else []
    )
    if validation.validation_prompts_dir:
        prompts = read_prompt_file(validation.validation_prompts_dir)
    negatives = None
    if validation.validation_negative_prompts_dir:
        negatives = read_validation_prompts(validation.validation_negative_prompts_dir)
    return with_negatives(prompts, negatives)


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
        prediction_type: str,
        zero_snr: bool,
        revision: str | None,
    ):
        self.validation, self.seed, self.output_dir = validation, seed, output_dir
        self.prompts = prompts  # validation_prompts(validation), read before any work
        self.accelerator, self.base, self.dtype = accelerator, base, dtype
        self.prediction_type, self.zero_snr, self.revision = prediction_type, zero_snr, revision

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
                    base,
                    base.denoiser,
                    base.text_encoders,
                    device,
                    self.prediction_type,
                    self.revision,
                    self.zero_snr,
                )
            except Exception as e:  # noqa: BLE001 - validation must never end a training run
                logger.error(
                    "validation at step %d failed (%s: %s); training continues", step, type(e).__name__, e
                )
                return
            self._run(pipe, step)

    def _run(self, pipe, step: int) -> bool:
        return run_validation(
            pipe, self.prompts, self.validation, self.seed, step, self.output_dir,
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
            return f"{VALIDATION_DIR}/step-{step}/00-{slugify(self.prompts[0].text)}_0.png"
        return None
