"""Class images for prior preservation (DreamBooth, Ruiz et al. 2023): what the base model draws for the class
prompt, generated once into --class_data_dir. Seeded per image, batched, and resumable: images already there
are kept, and only the missing ones are drawn, each written whole or not at all."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import UserError
from .fileio import atomic_file
from .images import find_images

logger = logging.getLogger(__name__)
NAME = "class_{:05d}.png"


def missing_class_images(folder: str | Path, wanted: int) -> list[int]:
    """Numbers of the class images to draw: up to `wanted` images in all, counting those already there."""
    folder = Path(folder)
    have = len(find_images(folder)) if folder.is_dir() else 0
    taken = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    todo, i = [], 0
    while have + len(todo) < wanted:
        if NAME.format(i) not in taken:
            todo.append(i)
        i += 1
    return todo


def generate_class_images(
    make_pipe, folder: str | Path, prompt: str | None, wanted: int, seed: int, batch_size: int,
    num_inference_steps: int = 30, guidance_scale: float = 7.5,
) -> int:  # fmt: skip
    """Draw the missing class images with the base model's pipeline (make_pipe(), made only when some are
    missing; image n from seed + n); returns how many were drawn."""
    from tqdm.auto import tqdm

    from .generation import generate

    todo = missing_class_images(folder, wanted)
    if not todo:
        return 0
    if not prompt:
        raise UserError(
            f"{folder}: holds fewer than --num_class_images {wanted} class images; pass --class_prompt to draw "
            "the rest with the base model, or add images, or lower --num_class_images"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = make_pipe()
    logger.info("drawing %d class images of %r into %s", len(todo), prompt, folder)
    with tqdm(total=len(todo), desc="class images") as bar:
        for run in _runs(todo, batch_size):  # image n from seed + n, whatever the batch it is drawn in
            images = generate(
                pipe, prompt, None, len(run), num_inference_steps, guidance_scale, seed + run[0]
            )
            for n, image in zip(run, images):
                with atomic_file(folder / NAME.format(n)) as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(run))
    return len(todo)


def _runs(numbers: list[int], size: int) -> list[list[int]]:
    """Consecutive numbers in batches of at most `size` (generate seeds image j of a batch with seed + j)."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and len(runs[-1]) < size and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs
