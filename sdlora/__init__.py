"""sdlora: the library behind the Stable Diffusion LoRA toolkit's scripts.

One module per concern: images (the one image loader), captions (caption files in every format),
models (base model and the built-in tiny model), data (training data), lora, training, checkpoints,
validation, generation and captioning.
"""

__version__ = "0.1.0"
