"""What the loop does after each step, in order: track the loss, log, score the held-out set, checkpoint,
stop early or on request, draw validation images. Each action is due on its own schedule."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoints import prune_checkpoints, save_checkpoint
from ..errors import UserError
from ..faults import maybe_kill, stop_requested
from ..heldout import append_csv, mean_loss, save_best
from ..layout import BEST_DIR, CSV_FILE
from .control import StopRequest, agree, check_finite

logger = logging.getLogger(__name__)


def every(number: int, interval: int | None, last: bool) -> bool:
    return last or bool(interval) and number % interval == 0


class Periodic:
    """The actions after each step of a run: `sections` are the configuration's outputs, checkpoints,
    validation and heldout sections (config.train); run: training.run.Run; validate(step): validation images;
    bar: the progress bar."""

    def __init__(self, sections, accelerator, run, validate, clock, bar, total_steps: int):
        self.outputs, self.checkpoints, self.validation, self.heldout = sections
        self.accelerator, self.run, self.validate, self.clock = accelerator, run, validate, clock
        self.bar, self.total = bar, total_steps
        self.output_dir = Path(self.outputs.output_dir)
        self.stop = StopRequest()
        self.bad_step = torch.full((), -1, device=accelerator.device)  # first non-finite step, on the device

    def after(self, step, loss: torch.Tensor) -> bool:
        """Every action due after `step`; True when the run ends here (early stopping)."""
        stopping = self.track(step, loss)
        if every(step.number, self.outputs.logging_steps, step.number == self.total):
            self.log(step, loss)
        self.run.advance(step)
        if self.run.probes is not None and self.heldout_due(step):
            with self.clock.phase("validation"):
                self.score_heldout(step)
        early = self.run.tracker is not None and self.run.tracker.should_stop
        if every(step.number, self.checkpoints.checkpointing_steps, stopping or early):
            with self.clock.phase("save"):
                self.checkpoint(step)
        if early:
            self.report_early_stop(step)
            return True
        if stopping:
            by = (
                f"signal {self.stop.signal}"
                if self.stop.signal is not None
                else "a signal to another process"
            )
            raise UserError(
                f"stopped by {by} after step {step.number}; "
                f"resume with --resume_from_checkpoint latest (saved {self.run.last_checkpoint})"
            )
        if step.number != self.total and self.validation_due(step):  # the final one uses the saved file
            with self.clock.phase("validation"), self.run.exported():
                self.validate(step.number)  # (in eval mode; every module's own mode is restored after)
        return False

    def close(self) -> None:
        self.stop.close()
        check_finite(self.bad_step, self.run.last_checkpoint)

    def track(self, step, loss: torch.Tensor) -> bool:
        """Note a non-finite loss (without waiting for the device) and a stop request; agreed by all processes."""
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss), step.number, self.bad_step)
        maybe_kill("step", step.number)  # tests only: a real SIGKILL at a chosen step
        if stop_requested(step.number):  # tests only: what Ctrl-C does, inside a test's process
            self.stop.signal = "SDLORA_STOP_AT"
        self.bar.update(1)
        stopping, self.bad_step = agree(self.accelerator, self.stop.signal is not None, self.bad_step)
        return stopping

    def log(self, step, loss: torch.Tensor) -> None:
        check_finite(self.bad_step, self.run.last_checkpoint)
        logs = {
            "loss": self.accelerator.reduce(loss, "mean").item(),
            "lr": self.run.lr_scheduler.get_last_lr()[0],
        }
        # Prior preservation's two parts (diffusers logs them as one): the mean loss of the instance and of
        # the class images since the last log, over every process.
        for part, (total, count) in sorted(self.run.loss_parts.items()):
            pair = torch.stack([torch.as_tensor(total, dtype=torch.float32, device=loss.device),
                                torch.tensor(float(count), device=loss.device)])  # fmt: skip
            total, count = self.accelerator.reduce(pair, "sum").tolist()
            if count:  # a bucket's batches may hold one part only (kohya's pairing, data.plan)
                logs[f"loss/{part}"] = total / count
        self.run.loss_parts.clear()
        self.bar.set_postfix(step=step.number, **logs)
        self.accelerator.log(logs, step=step.number)

    def validation_due(self, step) -> bool:
        validation = self.validation
        if validation.validation_steps:
            return step.number % validation.validation_steps == 0
        return step.last_of_epoch and (step.epoch + 1) % validation.validation_epochs == 0

    def heldout_due(self, step) -> bool:
        """--validation_loss_steps, else with the validation images; and at the end."""
        interval = self.heldout.validation_loss_steps
        if step.number == self.total or interval:
            return every(step.number, interval, step.number == self.total)
        return self.validation_due(step)

    def score_heldout(self, step) -> None:
        """Score the held-out and training probes; log them, append the CSV, keep best/ (main process)."""
        check_finite(self.bad_step, self.run.last_checkpoint)
        run, accelerator = self.run, self.accelerator
        base = run.conditioning.base
        with accelerator.autocast(), run.exported():  # (the EMA's weights, with --use_ema)
            losses = run.probes.evaluate(base.denoiser, base.text_encoders)
        val, train_loss = mean_loss(losses["val"]), mean_loss(losses["train"])
        improved = run.tracker.update(step.number, val)  # every process: they all decide to stop together
        if not accelerator.is_main_process:
            return
        append_csv(self.output_dir / CSV_FILE, step.number, val, train_loss, losses["val"])
        logs = {
            "val/loss": val,
            "val/train_loss": train_loss,
            **{f"val/loss_t{t}": v for t, v in losses["val"].items()},
        }
        accelerator.log(logs, step=step.number)
        logger.info(
            "held-out loss at step %d: %.5f (training images: %.5f)%s",
            step.number, val, train_loss, " best" if improved else "",
        )  # fmt: skip
        if improved:
            save_best(
                self.output_dir, step.number, val, lambda f: run.write_lora(f, step.number, step.epoch + 1)
            )
            run.saved(True)

    def checkpoint(self, step) -> None:
        """checkpoint-<step> from the main process, then prune (never the checkpoint this run resumed from)."""
        check_finite(self.bad_step, self.run.last_checkpoint)
        run, accelerator = self.run, self.accelerator
        if accelerator.is_main_process:
            run.last_checkpoint = save_checkpoint(
                self.output_dir,
                step.number,
                lambda folder: run.write_checkpoint_files(folder, step.number, step.epoch + 1),
                run.params,
                run.optimizer,
                run.lr_scheduler,
                accelerator.scaler,
                {"compat": run.compat, "heldout": run.tracker.state_dict() if run.tracker else None},
            )
            run.saved(True)
            prune_checkpoints(
                self.output_dir, self.checkpoints.checkpoints_total_limit, protect=run.resumed_from
            )
            logger.info("saved %s", run.last_checkpoint)
        accelerator.wait_for_everyone()

    def report_early_stop(self, step) -> None:
        tracker = self.run.tracker
        logger.warning(
            "early stopping after step %d: the held-out loss has not improved for %d evaluations "
            "(best %.5f at step %d, in %s)",
            step.number, tracker.bad_evals, tracker.best_loss, tracker.best_step, self.output_dir / BEST_DIR,
        )  # fmt: skip
