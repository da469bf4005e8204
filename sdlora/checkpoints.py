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
import re
import shutil
from pathlib import Path

import torch

from .errors import UserError
from .faults import maybe_kill
from .fileio import atomic_directory
from .lora import LORA_WEIGHT_NAME, load_lora_into_unet, lora_parameters, save_lora

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STALE_TMP_RE = re.compile(r"^\.checkpoint-\d+\..*\.tmp$")
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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


def _optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_bytes(unet: torch.nn.Module) -> int:
    """An upper estimate of one checkpoint's size: weights plus two Adam moments, in fp32, plus slack."""
    n = sum(p.numel() for p in lora_parameters(unet))
    return 3 * 4 * n + 1_000_000


def check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < needed:
        raise UserError(
            f"{folder}: not enough disk space for a checkpoint (needs about {needed / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free); free some space or pass another --output_dir. Nothing was deleted."
        )


def save_checkpoint(output_dir: Path, step: int, unet, optimizer, lr_scheduler, scaler, compat: dict) -> Path:
    """Write checkpoint-<step> atomically; an existing folder for the same step is replaced whole."""
    from safetensors.torch import save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    check_disk_space(output_dir, checkpoint_bytes(unet))
    final = output_dir / f"checkpoint-{step}"
    with atomic_directory(final, overwrite=True) as tmp:
        save_lora(unet, tmp)
        maybe_kill("save", step)  # tests: die with the folder half-written
        tensors, meta = _optimizer_to_files(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"meta": json.dumps(meta)})
        state = {
            "global_step": step,
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "compat": compat,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    return final


def read_state(path: Path) -> dict:
    """The checkpoint's JSON state: step, schedule, scaler and the settings it was trained with."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, unet, optimizer, lr_scheduler, scaler) -> dict:
    """Restore LoRA weights, optimizer, schedule and scaler from a checkpoint; return its state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = read_state(path)
    try:
        load_lora_into_unet(unet, path / LORA_WEIGHT_NAME)
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


def check_compatible(saved: dict, current: dict, checkpoint: Path, force: bool) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming each difference."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in current
        if saved.get(k) != current.get(k)
    ]
    if diffs and not force:
        raise UserError(
            f"{checkpoint}: was trained with other settings ({'; '.join(diffs)}); "
            "restore them, use a new --output_dir, or pass --force_resume"
        )


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


def compat_settings(args, num_processes: int, dataset) -> dict:
    """The settings a resumed run must share with its checkpoint to continue the same run."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "dataset": dataset._fingerprint,
        "examples": len(dataset),
        "resolution": args.resolution,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": num_processes,
        "seed": args.seed,
    }


def resume(args, unet, optimizer, lr_scheduler, scaler, compat: dict) -> tuple[int, Path | None]:
    """Restore the checkpoint named by --resume_from_checkpoint; return (steps done, its folder)."""
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        if args.resume_from_checkpoint:
            logger.info("no checkpoint in %s yet; starting a new run", args.output_dir)
        return 0, None
    # Compare settings before loading, so a different rank is named rather than failing on shapes.
    check_compatible(read_state(path)["compat"], compat, path, args.force_resume)
    saved = load_checkpoint(path, unet, optimizer, lr_scheduler, scaler)
    logger.info("resumed from %s at step %d", path, saved["global_step"])
    return saved["global_step"], path
