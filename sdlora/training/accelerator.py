"""The accelerator, precision and the environment checks that must fail before any model is loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import UserError


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights, from accelerate's resolved mixed-precision setting.

    accelerate's setting is the one source of truth, so `accelerate launch --mixed_precision fp16`
    alone is enough; LoRA weights and optimizer state stay fp32 whatever this returns.
    """
    if mixed_precision == "fp16":
        if device.type == "cpu":
            raise UserError("fp16 mixed precision does not run on a CPU; use --mixed_precision bf16 or no")
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def check_xformers() -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError(
            "--enable_xformers_memory_efficient_attention: xformers is not installed; drop the flag (PyTorch's SDPA is used)"
        ) from None


def refuse_sharded_training() -> None:
    """DeepSpeed and FSDP are refused before anything loads: the loop steps its own optimizer over
    gradient accumulation, which they would take over, and a LoRA on SD fits on one GPU anyway."""
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise UserError(
                f"{name} is not supported ({var} is set by your accelerate config or launch flags): a LoRA "
                "fits on one GPU; scale out with DDP instead (accelerate launch --multi_gpu --num_processes N)"
            )


def make_accelerator(
    mixed_precision: str | None, report_to: str, output_dir: Path, logging_dir: Path, unused_parameters: bool
):
    """The Accelerator and logging, after the checks that must fail before any model is loaded.

    Returns (accelerator, dtype of the frozen weights). `unused_parameters`: some trained weights may get
    no gradient (SDXL conditions on the first text encoder's penultimate layer, so with a trained text
    encoder the LoRA of its last layer gets none), which DDP must be told to expect (a small cost per step).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

    refuse_sharded_training()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
    )
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started > 1 and accelerator.num_processes == 1:
        raise UserError(
            f"{started} processes were started but each would train alone (no GPU for --multi_gpu): on CPUs, "
            "set ACCELERATE_USE_CPU=1 (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N)"
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"{accelerator.distributed_type.value} is not supported: a LoRA fits on one GPU; scale out with DDP "
            "instead (accelerate launch --multi_gpu --num_processes N)"
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    return accelerator, weight_dtype_for(accelerator.mixed_precision, accelerator.device)


def allow_fast_fp32_math(device: torch.device) -> None:
    """Let fp32 convolutions and matmuls use faster reduced-precision math (fp32 accumulation):
    TF32 on Ampere and newer GPUs; on CPUs with AMX or AVX512-BF16, oneDNN's bf16 math mode.
    Measured on a 2-core AMX Xeon: a 320-channel 3x3 conv forward+backward 49 -> 29 ms, a 4096x1280x1280
    matmul 39 -> 16 ms (bench/bench_training.py has whole-step numbers).

    Only PyTorch's newer precision API is used, and matmuls through set_float32_matmul_precision, which
    keeps every backend consistent: mixing it with the legacy `allow_tf32` flags makes
    torch.get_float32_matmul_precision() raise, and inductor calls it.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("medium")  # oneDNN bf16 on CPUs that have it
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
