"""The layout of a training run's output folder: the names of what the trainer writes there, the
checkpoints it holds, and what an earlier run left (what --overwrite_output_dir replaces)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The same weights under kohya's key names, which AUTOMATIC1111 and ComfyUI load as they are. diffusers'
# load_lora_weights(folder) still picks LORA_WEIGHT_NAME when both are in a folder.
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
# With an EMA (or schedule-free AdamW) the two files above hold the EMA (averaged) weights; the weights as
# trained, which a resume continues from, go beside them under this name (diffusers format).
RAW_WEIGHT_NAME = "pytorch_lora_weights_raw.safetensors"
EMA_FILE = "ema.safetensors"  # a checkpoint's EMA state
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STALE_TMP_RE = re.compile(r"^\.checkpoint-\d+\..*\.tmp$")
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
BEST_DIR, BEST_STEP_FILE = "best", "step.json"
CSV_FILE, CURVE_FILE = "validation_loss.csv", "validation_loss.png"
VALIDATION_DIR = "validation"
CONFIG_FILE, ARGS_FILE, CARD_FILE = "config.toml", "args.json", "README.md"
# Files a run writes at the top of its folder (the cache is keyed by its content and is kept).
RUN_FILES = (
    LORA_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    RAW_WEIGHT_NAME,
    CSV_FILE,
    CURVE_FILE,
    CONFIG_FILE,
    ARGS_FILE,
    CARD_FILE,
)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first; other folders are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


@dataclass
class EarlierRun:
    """What an earlier run left in the output folder, found when this run starts, and removed only once this
    run has saved something of its own (its first checkpoint, best/ or final LoRA): a run that fails before
    then leaves the earlier one as it was. Each entry is identified by its inode, so a file or folder this
    run has already replaced under the same name (a validation/step-N folder, say) is never removed."""

    entries: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)

    @classmethod
    def find(cls, output_dir: str | Path, logging_dir: str) -> EarlierRun:
        root = Path(output_dir)
        if not root.is_dir():
            return cls()
        found = [root / n for n in RUN_FILES if (root / n).exists()]
        found += [p for _, p in list_checkpoints(root)]
        found += [p for p in root.iterdir() if STALE_TMP_RE.match(p.name)]
        if (root / BEST_DIR).is_dir():
            found.append(root / BEST_DIR)
        if (root / VALIDATION_DIR).is_dir():  # (this run replaces a step-N folder whole, with a new inode)
            found += sorted((root / VALIDATION_DIR).iterdir())
        if (root / logging_dir).is_dir():  # the event files: this run writes its own beside them
            found += sorted(p for p in (root / logging_dir).rglob("*") if p.is_file())
        return cls([(p, _identity(p)) for p in found])

    @property
    def checkpoints(self) -> list[Path]:
        return [p for p, _ in self.entries if CHECKPOINT_RE.match(p.name)]

    def remove(self) -> None:
        """Delete the earlier run's files and folders (once; those replaced since are left alone)."""
        for path, identity in self.entries:
            try:
                if _identity(path) != identity:
                    continue
            except FileNotFoundError:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self.entries:
            logger.info(
                "removed the %d files and folders an earlier run left (--overwrite_output_dir)",
                len(self.entries),
            )
        self.entries = []
