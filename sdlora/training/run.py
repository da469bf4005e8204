"""The state of a training run: what the loop updates, saves and resumes, every field declared here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import check_resume, load_checkpoint, read_state, resolve_resume
from ..errors import UserError
from ..heldout import BestTracker, LossProbes, truncate_csv
from ..layout import CSV_FILE, EMA_FILE, EarlierRun
from ..lora import add_adapters, lora_parameters, save_lora_files
from .conditioning import Conditioning
from .ema import LoraEMA, exported
from .optimization import (
    apply_hyperparameters,
    learning_rates,
    make_lr_scheduler,
    make_optimizer,
    param_groups,
)

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What the training loop updates, saves and resumes."""

    family: object  # families.Family
    adapted: dict[str, torch.nn.Module]  # the adapted models themselves (what is saved and restored)
    models: dict[str, torch.nn.Module]  # as prepared by accelerate (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]  # the LoRA weights: all that is trained, clipped and saved
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    objective: object  # objectives.DiffusionObjective
    conditioning: Conditioning
    describe: Callable[[int, int], dict]  # (step, epoch): the LoRA files' metadata as of that step
    compat: dict  # the settings a resume must match (training.settings.resume_settings)
    group_lrs: list[float]  # this run's learning rate of each parameter group
    dtype: torch.dtype
    steps: list  # data.Step: every step of the run for this process
    ema: LoraEMA | None = None  # --use_ema
    # The loss of each part (instance, prior) since the last log: (sum on the device, examples); step.py adds.
    loss_parts: dict[str, tuple] = field(default_factory=dict)
    probes: LossProbes | None = None
    tracker: BestTracker | None = None
    first_step: int = 0  # steps done before this process started (a resumed checkpoint's)
    last_step: int = 0  # the last step done
    epoch: int = 0  # the (1-based) epoch the last step done is in
    resumed_from: Path | None = None  # the checkpoint this run resumed from: never pruned
    last_checkpoint: Path | None = None  # the resume source, then each checkpoint saved
    earlier: EarlierRun = field(
        default_factory=EarlierRun
    )  # an earlier run's outputs, gone at the first save

    def remaining_steps(self) -> list:
        return self.steps[self.first_step :]

    def advance(self, step) -> None:
        """Record that `step` (data.Step) is done, after the optimizer step (and the EMA's update)."""
        if self.ema is not None:
            self.ema.step(step.number)
        self.last_step, self.epoch = step.number, step.epoch + 1

    @property
    def exports_other_weights(self) -> bool:
        """Whether the saved LoRA differs from the weights as trained (an EMA, schedule-free's average)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return self.ema is not None or callable(getattr(inner, "eval", None))

    def exported(self):
        """The exported weights swapped into the models for a block (validation, held-out loss, saving)."""
        return (
            exported(self.ema, self.optimizer, self.params)
            if self.exports_other_weights
            else contextlib.nullcontext()
        )

    def write_lora(self, folder: Path, step: int, epoch: int) -> None:
        """The LoRA files as of `step` (the exported weights, and the raw ones beside them when they differ),
        and the EMA's state in checkpoints: the one writer of checkpoints, best/ and the final outputs."""
        exporting = self.exported if self.exports_other_weights else None
        save_lora_files(self.adapted, self.family, folder, self.describe(step, epoch), exporting)

    def write_checkpoint_files(self, folder: Path, step: int, epoch: int) -> None:
        self.write_lora(folder, step, epoch)
        if self.ema is not None:
            from safetensors.torch import save_file

            save_file(self.ema.state_dict(), str(folder / EMA_FILE))

    def saved(self, is_main_process: bool) -> None:
        """This run has written something of its own: what an earlier run left can go now."""
        if is_main_process:
            self.earlier.remove()


def make_run(
    opt,
    optimizer_cfg,
    ema_cfg,
    speed,
    accelerator,
    base,
    settings,
    images,
    caches,
    objective,
    describe,
    compat,
    steps,
    dtype,
) -> Run:
    """Adapters, optimizer, schedule, EMA and conditioning of a new run (opt, optimizer_cfg, ema_cfg and
    speed: config.train's OptimizationConfig, OptimizerConfig, EMAConfig and SpeedConfig; settings:
    training.settings.RunSettings; describe(step, epoch): the files' metadata as of a step)."""
    models = add_adapters(base, settings.adapter, opt.seed)
    family, denoiser = base.family, base.denoiser
    rates = learning_rates(
        settings.schedule, optimizer_cfg, family.denoiser, lambda m: family.lora_block(m, denoiser.config)
    )
    groups = param_groups(models, rates)
    optimizer = make_optimizer(groups, opt, optimizer_cfg, accelerator.device)
    if callable(
        getattr(optimizer, "train", None)
    ):  # schedule-free starts in train mode, and leaves it to save
        optimizer.train()
    lr_scheduler = make_lr_scheduler(
        optimizer, opt.lr_scheduler, opt.lr_warmup_steps, settings.schedule.max_train_steps
    )
    # The schedule is not prepared: accelerate would step it once per process; it is stepped once per step.
    *modules, optimizer = accelerator.prepare(*models.values(), optimizer)
    prepared = dict(zip(models, modules))
    if speed.torch_compile:
        prepared[family.denoiser] = torch.compile(
            prepared[family.denoiser], backend=speed.torch_compile_backend
        )
    encoders = [prepared.get(n, e) for n, e in zip(family.text_encoders, base.text_encoders)]
    params = [p for m in models.values() for p in lora_parameters(m)]
    ema = (
        LoraEMA(params, ema_cfg.ema_decay, ema_cfg.ema_update_interval, ema_cfg.ema_on_cpu)
        if ema_cfg.use_ema
        else None
    )
    return Run(
        family,
        models,
        prepared,
        params,
        optimizer,
        lr_scheduler,
        objective,
        Conditioning(base, images, *caches, encoders, accelerator.device, dtype),
        describe,
        compat,
        [g["lr"] for g in groups],
        dtype,
        steps,
        ema,
    )


# Settings that, changed with --force_resume, are applied over what the checkpoint's optimizer restores.
OPTIMIZER_SETTINGS = {
    "learning_rate", "unet_lr", "text_encoder_lr", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon",
}  # fmt: skip


def restore(run: Run, checkpoint: Path | None, differing: list[str], accelerator, opt) -> dict:
    """Load a checkpoint's LoRA weights, optimizer, schedule and scaler into the run (opt:
    config.train.OptimizationConfig); with --force_resume over other optimizer settings, train on with this
    run's and say so. Returns the checkpoint's JSON state ({} without one)."""
    if checkpoint is None:
        return {}
    state = load_checkpoint(checkpoint, run.adapted, run.optimizer, run.lr_scheduler, accelerator.scaler)
    if run.ema is not None:
        from safetensors.torch import load_file

        run.ema.load_state_dict(load_file(str(checkpoint / EMA_FILE)))
    if set(differing) & OPTIMIZER_SETTINGS:
        apply_hyperparameters(run.optimizer, run.lr_scheduler, run.group_lrs, opt)
    run.first_step = run.last_step = state["global_step"]
    run.epoch = run.steps[run.first_step - 1].epoch + 1 if 0 < run.first_step <= len(run.steps) else 0
    run.resumed_from = run.last_checkpoint = checkpoint
    logger.info("resumed from %s at step %d", checkpoint, state["global_step"])
    return state


def start_tracker(heldout, output_dir: Path, probes, state: dict, first_step: int, is_main_process: bool):
    """The best-loss tracker as the resumed checkpoint left it (or new; heldout: config.train.HeldoutConfig),
    and the loss table cut back to match (a killed run's later rows are computed again)."""
    if probes is None:
        return None
    if is_main_process:
        if first_step:
            truncate_csv(output_dir / CSV_FILE, first_step)
        else:
            (output_dir / CSV_FILE).unlink(missing_ok=True)
    patience, min_delta = heldout.early_stopping_patience, heldout.early_stopping_min_delta
    if state.get("heldout"):
        return BestTracker.from_state(state["heldout"], patience, min_delta)
    return BestTracker(patience=patience, min_delta=min_delta)


def find_checkpoint(
    checkpoints, output_dir: Path, compat: dict, total_steps: int
) -> tuple[Path | None, list[str]]:
    """The checkpoint --resume_from_checkpoint names (checkpoints: config.train.CheckpointConfig), checked
    before any work: its settings against this run's, and its step against the run's length. Returns it (or
    None) and the settings that differ with --force_resume."""
    path = resolve_resume(output_dir, checkpoints.resume_from_checkpoint)
    if path is None:
        if checkpoints.resume_from_checkpoint:
            logger.info("no checkpoint in %s yet; starting a new run", output_dir)
        return None, []
    differing = check_resume(path, compat, checkpoints.force_resume)
    step = read_state(path)["global_step"]
    if step > total_steps:
        raise UserError(
            f"{path}: is at step {step}, past the {total_steps} steps this run trains (--max_train_steps or "
            "--num_train_epochs); raise them to continue it, or resume from an earlier checkpoint"
        )
    return path, differing
