"""sdlora: the library behind the Stable Diffusion LoRA toolkit's scripts.

One module per concern: images (the one image loader), captions (caption files in every format),
models and families (the base model, SD 1.x / 2.x / SDXL), tiny_model (the built-in tiny models), data,
buckets and caption_controls (training data), cache, lora, training, checkpoints, validation,
generation, captioning and lora_tools.
"""

import logging

__version__ = "0.1.0"


def _drop(logger_name: str, text: str) -> None:
    """Filter one library message that a user cannot act on, and nothing else from that logger."""
    logging.getLogger(logger_name).addFilter(lambda record: text not in record.getMessage())


# bitsandbytes on a CPU without the optional `kernels` package (4-bit inference only; unused here).
_drop("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
# transformers without torchvision falls back to its PIL image processors, which is what we want.
_drop("transformers.utils.import_utils", "requires torchvision (not installed)")
