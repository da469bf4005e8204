"""LoRA tools: inspect, convert, resize, merge and fuse LoRA files, ours and kohya/A1111 alike
(`python -m sdlora.lora_tools`; the operations, one module each, are importable on their own)."""

from .cli import main
from .files import FORMATS, default_format, file_format, output_path
from .fuse import fuse, load_base_pipeline
from .info import block_of, describe
from .svd import DYNAMIC_METHODS, ModuleResize, choose_rank, merge_weights, resize_weights

__all__ = [
    "DYNAMIC_METHODS",
    "FORMATS",
    "ModuleResize",
    "block_of",
    "choose_rank",
    "default_format",
    "describe",
    "file_format",
    "fuse",
    "load_base_pipeline",
    "main",
    "merge_weights",
    "output_path",
    "resize_weights",
]
