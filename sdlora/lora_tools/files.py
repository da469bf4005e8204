"""Which format a LoRA file is in, and where a tool writes its output."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..layout import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from ..lora_files import lora_format
from ..lora_weights import write_diffusers, write_kohya

FORMATS = ("diffusers", "kohya")
WRITERS = {"diffusers": write_diffusers, "kohya": write_kohya}
_DEFAULT_NAMES = {"diffusers": LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}


def file_format(path: Path) -> str:
    """'diffusers' or 'kohya' (or 'attn-procs') of a LoRA file, from its key names."""
    if path.suffix.lower() != ".safetensors":
        return "attn-procs"  # the original toolkit's .bin
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return lora_format(list(f.keys())) or "diffusers"


def default_format(path: Path) -> str:
    """The format outputs of a file are written in unless --to says: its own (the old .bin: ours)."""
    fmt = file_format(path)
    return "diffusers" if fmt == "attn-procs" else fmt


def output_path(output: str | Path, fmt: str, overwrite: bool) -> Path:
    """The file to write: `output` if it names a .safetensors file, else the format's usual file name in
    that folder (so that `pipe.load_lora_weights(folder)` finds it); an existing file only with overwrite."""
    path = Path(output)
    if path.suffix.lower() != ".safetensors":
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: not a folder; give a folder or a path ending in .safetensors")
        path = path / _DEFAULT_NAMES[fmt]
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it, or another --output")
    return path
