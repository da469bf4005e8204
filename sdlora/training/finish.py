"""After the last step: the final LoRA files, the resolved configuration, the model card, a validation pass
with the saved file, and the upload (main process only)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import UserError
from ..faults import maybe_fail
from ..heldout import plot_loss_curve
from ..layout import BEST_DIR, CSV_FILE, CURVE_FILE
from ..outputs import write_config, write_model_card
from .settings import args_json, resolved_config

logger = logging.getLogger(__name__)


def heldout_card(output_dir: Path, tracker) -> list[str]:
    """The model card's held-out loss section: the curve, the best step and how to load best/."""
    if tracker is None or tracker.best_step is None:
        return []
    curve = plot_loss_curve(output_dir / CSV_FILE, output_dir / CURVE_FILE, tracker.best_step)
    lines = ["## Held-out loss", ""]
    if curve:
        lines += [f"![held-out and training loss]({CURVE_FILE})", ""]
    lines += [
        f"Lowest held-out loss {tracker.best_loss:.5f} at step {tracker.best_step} (every evaluation: "
        f"`{CSV_FILE}`). That step's LoRA is in `{BEST_DIR}/`; load it instead of the final weights with "
        f'`pipe.load_lora_weights("{output_dir / BEST_DIR}")`.',
        "",
    ]
    return lines


def save_final_lora(run, output_dir: Path) -> None:
    """Both LoRA files at the top of the output folder, or neither: a failed write (a full disk, say) ends
    in one line that says where the last checkpoint is."""
    try:
        maybe_fail("final-save")  # tests only: the disk is full here
        run.write_lora(output_dir, run.last_step, run.epoch)
    except OSError as e:
        kept = (
            f"the last checkpoint is {run.last_checkpoint}"
            if run.last_checkpoint
            else "no checkpoint was saved"
        )
        raise UserError(
            f"{output_dir}: the final LoRA could not be written ({e.strerror or e}); {kept}; free some space "
            "and resume with --resume_from_checkpoint latest"
        ) from None
    run.saved(True)  # (main process only)
    logger.info("saved the LoRA to %s", output_dir)


def save_outputs(cfg, settings, accelerator, run, validator, dataset_desc: str, clock) -> None:
    """Final LoRA files, the resolved configuration and the model card, then a validation pass with the saved
    file (whose failure costs nothing) and the upload with --push_to_hub."""
    if not accelerator.is_main_process:
        return
    output_dir = Path(cfg.outputs.output_dir)
    with clock.phase("save"):
        save_final_lora(run, output_dir)
    resolved = resolved_config(cfg, settings)
    write_config(output_dir, resolved, args_json(resolved))
    card = heldout_card(output_dir, run.tracker)
    write_model_card(output_dir, cfg, settings, dataset_desc, validator.prompts, None, card)
    with clock.phase("validation"):
        grid = validator.final(settings.model, cfg.model.variant, run.last_step)
    if grid:
        write_model_card(output_dir, cfg, settings, dataset_desc, validator.prompts, grid, card)
    if cfg.outputs.push_to_hub:
        from ..hub import upload_folder_or_explain

        upload_folder_or_explain(
            output_dir,
            settings.hub_model_id,
            cfg.outputs.hub_token,
            "model",
            ignore_patterns=["checkpoint-*/**", "cache/**", ".*"],
        )
