"""Where models run: CUDA in float16 when there is a GPU, otherwise the CPU in float32; either can be named."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_device(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run on; None or "auto" chooses. Used by captioning and generation alike."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA GPU is available here; use cpu")
    if dtype in (None, "auto"):
        dtype = torch.float16 if device.type == "cuda" else torch.float32  # half the memory on a GPU
    elif not isinstance(dtype, torch.dtype):
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: unknown; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype == torch.float16 and device.type == "cpu":
        # Many CPU kernels have no float16 version or run it far slower than float32.
        raise UserError("float16 on the CPU is slow or unsupported; use float32 or bfloat16")
    return device, dtype
