"""best/: the LoRA of the lowest held-out loss so far, and early stopping on it."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_directory
from ..layout import BEST_DIR, BEST_STEP_FILE


@dataclass
class BestTracker:
    """The lowest held-out loss so far and the evaluations since it, for best/ and early stopping."""

    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    patience: int | None = None  # --early_stopping_patience; None never stops
    min_delta: float = 0.0  # --early_stopping_min_delta: smaller gains do not count as improvement

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is the new best (the first finite one, or lower than the best
        by more than min_delta). A non-finite loss never improves."""
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.bad_evals = float(loss), int(step), 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        """Plain JSON for the checkpoint's training_state.json (the settings come from the flags)."""
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    @classmethod
    def from_state(cls, state: dict, patience: int | None = None, min_delta: float = 0.0) -> BestTracker:
        """The tracker a checkpoint saved, with this run's --early_stopping_patience and min_delta."""
        return cls(state["best_loss"], state["best_step"], int(state["bad_evals"]), patience, min_delta)


def save_best(output_dir: str | Path, step: int, loss: float, write_lora: Callable[[Path], object]) -> Path:
    """Replace output_dir/best/ atomically with the LoRA of `step` (written by `write_lora`, the same writer
    as the final output) and step.json {"step", "val_loss"}; on any failure the previous best/ is kept."""
    final = Path(output_dir) / BEST_DIR
    try:
        with atomic_directory(final, overwrite=True) as tmp:
            write_lora(tmp)
            (tmp / BEST_STEP_FILE).write_text(json.dumps({"step": int(step), "val_loss": float(loss)}) + "\n")
    except OSError as e:  # e.g. the disk filled up: the new folder was removed whole
        raise UserError(
            f"{final}: could not be written ({getattr(e, 'strerror', None) or e}); free some space or pass another "
            "--output_dir (the previous best/ is kept)"
        ) from None
    return final


def read_best(output_dir: str | Path) -> dict | None:
    """best/step.json ({"step", "val_loss"}), or None if there is no best/ yet."""
    path = Path(output_dir) / BEST_DIR / BEST_STEP_FILE
    return json.loads(path.read_text()) if path.exists() else None
