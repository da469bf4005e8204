"""Training checkpoints: written whole or not at all, pruned safely, resumed exactly.

A checkpoint folder `checkpoint-<step>` holds the LoRA weights in the same file format as the final
output (so inference can use any checkpoint), the optimizer state, and a JSON file with the step,
the learning-rate schedule, the loss scaler and the settings a resume must match. Everything is
safetensors or JSON: nothing is pickled. The folder is written under a temporary name and renamed
into place only when complete, so a crash mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError
from .faults import maybe_kill
from .fileio import atomic_directory
from .layout import (
    LORA_WEIGHT_NAME,
    OPTIMIZER_FILE,
    RAW_WEIGHT_NAME,
    STALE_TMP_RE,
    STATE_FILE,
    EarlierRun,
    list_checkpoints,
)
from .lora import load_lora_into_models

logger = logging.getLogger(__name__)
__all__ = ["OPTIMIZER_FILE", "STATE_FILE", "list_checkpoints"]  # (re-exported: where checkpoints are named)


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: None, 'latest' (None when there is none yet) or a path."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not path.is_dir() and (Path(output_dir) / value).is_dir():
        path = Path(output_dir) / value
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"{value}: not a complete checkpoint folder; pass 'latest' or a checkpoint-<step> folder"
        )
    return path


def _to_json(value, path: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON, with every tensor, however deeply nested, moved to `tensors` under its path."""
    if torch.is_tensor(value):
        tensors[path] = (
            value.detach().to("cpu").clone().contiguous()
        )  # clone: safetensors refuses shared storage
        return {"tensor": path}
    if isinstance(value, dict):  # keys may be ints (parameter indices) or strings
        return {"dict": [[k, _to_json(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {
            "tuple" if isinstance(value, tuple) else "list": [
                _to_json(v, f"{path}/{i}", tensors) for i, v in enumerate(value)
            ]
        }
    return {"value": value}


def _from_json(node, tensors: dict[str, torch.Tensor]):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _from_json(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_from_json(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_from_json(v, tensors) for v in node["tuple"])
    return node["value"]


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as (tensors, JSON): any nesting, e.g. bitsandbytes' quantization state
    under `__bnb_optimizer_quant_state__`, and no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _to_json(state, "optimizer", tensors)


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    return _from_json(meta, tensors)


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """An upper estimate of one checkpoint's size: weights plus two Adam moments, in fp32, plus slack."""
    return 3 * 4 * sum(p.numel() for p in params) + 1_000_000


def check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < needed:
        raise UserError(
            f"{folder}: not enough disk space for a checkpoint (needs about {needed / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free); free some space or pass another --output_dir. Nothing was deleted."
        )


def save_checkpoint(
    output_dir: Path,
    step: int,
    write_lora: Callable[[Path], object],
    params: list[torch.nn.Parameter],
    optimizer,
    lr_scheduler,
    scaler,
    state: dict,
) -> Path:
    """Write checkpoint-<step> atomically: the LoRA file(s) by `write_lora` (the same writer as the final
    output), the optimizer state, and `state` (the loop's JSON state) with the step, schedule and scaler.
    An existing folder for the same step is replaced whole."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    check_disk_space(output_dir, checkpoint_bytes(params))
    final = output_dir / f"checkpoint-{step}"
    try:
        with atomic_directory(final, overwrite=True) as tmp:
            write_lora(tmp)
            maybe_kill("save", step)  # tests: die with the folder half-written
            tensors, meta = _optimizer_to_files(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"meta": json.dumps(meta)})
            full = {
                "global_step": step,
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                **state,
            }
            # (Adafactor's own schedule reports its rates as tensors: they go in as numbers)
            (tmp / STATE_FILE).write_text(json.dumps(full, indent=2, default=_number))
    except (
        OSError,
        SafetensorError,
    ) as e:  # the disk filled up during the write: the folder was removed whole
        raise UserError(
            f"{final}: could not be written ({getattr(e, 'strerror', None) or e}); free some space or pass another --output_dir. "
            "Nothing was deleted."
        ) from None
    return final


def _number(value):
    if torch.is_tensor(value):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a checkpoint's state")


def read_state(path: Path) -> dict:
    """The checkpoint's JSON state: step, schedule, scaler and the settings it was trained with."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, models: dict[str, torch.nn.Module], optimizer, lr_scheduler, scaler) -> dict:
    """Restore LoRA weights, optimizer, schedule and scaler from a checkpoint; return its state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = read_state(path)
    try:
        raw = path / RAW_WEIGHT_NAME  # the weights as trained, where the LoRA files hold an EMA
        load_lora_into_models(models, raw if raw.is_file() else path / LORA_WEIGHT_NAME)
        with safe_open(str(path / OPTIMIZER_FILE), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(path / OPTIMIZER_FILE)), meta))
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # shape mismatch, missing or damaged file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: cannot be loaded into this run ({first_line}); resume with the settings it was saved with"
        ) from None
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


def check_compatible(saved: dict, current: dict, checkpoint: Path, force: bool) -> list[str]:
    """Refuse a resume whose settings differ from the checkpoint's, naming each difference; returns the
    differing keys (with --force_resume, which goes on). A checkpoint of an earlier sdlora that did not record
    a setting cannot be checked for it: said once, not refused."""
    unrecorded = [k for k in current if k not in saved]
    diffs = [
        f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}"
        for k in current
        if k in saved and saved[k] != current[k]
    ]
    if diffs and not force:
        raise UserError(
            f"{checkpoint}: was trained with other settings ({'; '.join(diffs)}); "
            "restore them, use a new --output_dir, or pass --force_resume"
        )
    if diffs:
        logger.warning("resuming despite other settings (--force_resume): %s", "; ".join(diffs))
    if unrecorded:
        logger.warning(
            "%s does not record %s (an earlier version wrote it); not checked",
            checkpoint,
            ", ".join(unrecorded),
        )
    return [k for k in current if k in saved and saved[k] != current[k]]


def prune_checkpoints(output_dir: Path, keep: int | None, protect: Path | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints by step number; never remove `protect`.

    Called only after a new checkpoint is complete. Folders that are not checkpoints are left alone;
    temporary folders left by a save that was killed are removed.
    """
    removed = []
    for stale in output_dir.iterdir() if output_dir.is_dir() else []:
        if STALE_TMP_RE.match(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return removed
    found = list_checkpoints(output_dir)
    protected = protect.resolve() if protect is not None else None
    for _, path in found[: max(0, len(found) - keep)]:
        if protected is not None and path.resolve() == protected:
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def find_earlier_run(output_dir: str | Path, logging_dir: str, resuming: bool, overwrite: bool) -> EarlierRun:
    """What an earlier run left in --output_dir, which a new run must not mix with its own (pruning would
    delete each new checkpoint right after writing it, `latest` would resume the other run, and best/ or the
    loss curve would be the other run's).

    A folder with an earlier run's checkpoints is refused unless this run resumes (--resume_from_checkpoint)
    or --overwrite_output_dir lets them go; with it, everything the earlier run wrote is returned, to be
    removed once this run has saved something of its own.
    """
    if resuming:
        return EarlierRun()
    earlier = EarlierRun.find(output_dir, logging_dir)
    if earlier.checkpoints and not overwrite:
        raise UserError(
            f"{output_dir}: holds {sorted(earlier.checkpoints, key=_step_of)[-1].name} from an earlier run; pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir"
        )
    return earlier if overwrite else EarlierRun()


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def check_resume(path: Path, compat: dict, force: bool) -> list[str]:
    """Compare settings before loading anything (refused before any work, and a different rank is named
    rather than failing on shapes); returns the settings that differ with --force_resume."""
    return check_compatible(read_state(path)["compat"], compat, path, force)
