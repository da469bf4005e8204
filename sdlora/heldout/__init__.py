"""Held-out validation loss: the split and fixed probes (split), the deterministic loss (probes), the best
LoRA and early stopping (best), and the loss table and curve (curve)."""

from ..layout import BEST_DIR, BEST_STEP_FILE, CSV_FILE
from .best import BestTracker, read_best, save_best
from .curve import BEST_COLOR, TRAIN_COLOR, VAL_COLOR, append_csv, plot_loss_curve, read_csv, truncate_csv
from .probes import (
    LossProbes,
    ProbeExample,
    ProbeSet,
    collate_inputs,
    evaluating,
    heldout_loss,
    mean_loss,
    split_inputs,
)
from .split import (
    MAX_TRAIN_PROBES,
    probe_crop,
    probe_noise,
    probe_timesteps,
    split_examples,
    train_probe_indices,
)

__all__ = [
    "BEST_COLOR",
    "BEST_DIR",
    "BEST_STEP_FILE",
    "CSV_FILE",
    "MAX_TRAIN_PROBES",
    "TRAIN_COLOR",
    "VAL_COLOR",
    "BestTracker",
    "LossProbes",
    "ProbeExample",
    "ProbeSet",
    "append_csv",
    "collate_inputs",
    "evaluating",
    "heldout_loss",
    "mean_loss",
    "plot_loss_curve",
    "probe_crop",
    "probe_noise",
    "probe_timesteps",
    "read_best",
    "read_csv",
    "save_best",
    "split_examples",
    "split_inputs",
    "train_probe_indices",
    "truncate_csv",
]
