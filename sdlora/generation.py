"""Image generation shared by training-time validation, the inference notebook and `python -m sdlora.generate`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image


def slugify(prompt: str, max_len: int = 60) -> str:
    """A folder-safe name for a prompt: lowercase words joined by dashes."""
    slug = re.sub(r"[^\w]+", "-", prompt.lower(), flags=re.UNICODE).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def generate(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    num_images: int = 1,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    lora_scale: float | None = None,
) -> list[Image.Image]:
    """Images for one prompt; image i uses seed + i on a CPU generator, so results match across devices."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    kwargs = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale is not None else {}
    with torch.no_grad():
        return pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            **kwargs,
        ).images


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side in rows of `columns` (all in one row by default)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_images(images: list[Image.Image], folder: Path, stem: str = "image") -> list[Path]:
    """Save as <stem>_<i>.png, numbering on from existing files so earlier results are never overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(1))
        for p in folder.glob(f"{stem}_*.png")
        if (m := re.fullmatch(rf"{re.escape(stem)}_(\d+)\.png", p.name))
    ]
    start = max(taken) + 1 if taken else 0
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_{start + i}.png"
        image.save(path)
        paths.append(path)
    return paths
