"""Checks of the training data before any step: every image decoded once, and the captions as trained."""

from __future__ import annotations

from ..images import load_image
from .pictures import TrainImages, image_source


def check_images(
    images: TrainImages, resolution: int, upscales: bool = True
) -> tuple[list[str], list[str], list[int]]:
    """Decode every image once, before any step: all unusable files are named together (not one crash
    mid-run) and each usable image's size is recorded. Returns (warnings users need, problems, the unusable
    indices); the caller refuses or skips the unusable ones."""
    from ..images import ImageReport, InvalidImageError

    problems, bad, report, small = [], [], ImageReport(), 0
    images.sizes = []
    for index in range(len(images)):
        source, name = image_source(images.dataset[index][images.image_column])
        try:
            loaded = load_image(source, name=name, background=images.augment.background)
        except InvalidImageError as e:
            problems.append(str(e))
            bad.append(index)
            continue
        report.add(loaded)
        images.sizes.append(loaded.image.size)
        small += min(loaded.image.size) < resolution
    warnings = []
    if small and upscales:
        warnings.append(
            f"{small} of {len(images)} images are smaller than {resolution} px and will be upscaled"
        )
    if report.counts:
        warnings.append(report.summary())
    return warnings, problems, bad


def check_captions(captions: list[str], tokenizer) -> list[str]:
    """Warnings about the captions as trained: empty ones, and ones the text encoder truncates."""
    warnings = []
    empty = sum(not c.strip() for c in captions)
    if empty:
        warnings.append(f"{empty} captions are empty; those images train as unconditional examples")
    limit = tokenizer.model_max_length
    long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
    if long:
        warnings.append(
            f"{len(long)} captions are longer than {limit} tokens; the text encoder sees only their first "
            f"{limit} tokens (start and end tokens included), e.g. {long[0][:80]!r}"
        )
    return warnings
