"""Images + captions (+ masks) -> a Hugging Face `datasets.Dataset` with `image`, `text` (and `mask`) columns.

`text` is a string column, or a list of strings for every row when any image has several captions (the
trainer draws one per example and epoch). `mask` (with masks) holds 8-bit grayscale PNGs at the image's
size, white = learn. An image with transparency is stored as RGBA when asked (`keep_alpha`), else composited
on the background colour.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .captions import read_caption_lists_json, read_caption_lists_jsonl, read_caption_lists_txt
from .dataset_writer import WHITE, CheckedExample, _load_mask, _stat, write_dataset
from .errors import UserError
from .images import (
    ImageReport,
    InvalidImageError,
    LoadedImage,
    find_images,
    load_image,
    report_problems,
)

CLIP_MAX_TOKENS = 77


@dataclass
class Example:
    image_path: Path
    captions: tuple[str, ...]  # one or more, stripped and non-empty
    mask_path: Path | None = None  # with --masks_dir


@dataclass
class Summary:
    count: int = 0
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    smaller_than_resolution: int = 0
    long_captions: list[str] = field(default_factory=list)
    skipped: int = 0
    several_captions: int = 0  # images with more than one caption
    masks: int = 0
    alpha_kept: int = 0  # images stored as RGBA with their transparency (--keep_alpha)
    report: ImageReport = field(default_factory=ImageReport)

    def add(
        self, example: Example, loaded: LoadedImage, alpha: bool, tokenizer, resolution: int | None
    ) -> None:
        """Count one checked example: its size, captions (each one's tokens), mask and conversions."""
        w, h = loaded.image.size
        self.count += 1
        self.min_size = min(self.min_size or (w, h), (w, h), key=lambda s: s[0] * s[1])
        self.max_size = max(self.max_size or (w, h), (w, h), key=lambda s: s[0] * s[1])
        if resolution and min(w, h) < resolution:
            self.smaller_than_resolution += 1
        if tokenizer is not None:
            self.long_captions += [
                c for c in example.captions if len(tokenizer(c).input_ids) > CLIP_MAX_TOKENS
            ]
        self.several_captions += len(example.captions) > 1
        self.masks += example.mask_path is not None
        self.alpha_kept += alpha
        # A kept alpha channel is not "composited on the background colour": counted above instead.
        self.report.counts.update(n for n in loaded.notes if not (alpha and n == "transparency"))

    def lines(self, resolution: int | None) -> list[str]:
        out = [f"{self.count} images, sizes from {_fmt(self.min_size)} to {_fmt(self.max_size)}"]
        if resolution and self.smaller_than_resolution:
            out.append(
                f"{self.smaller_than_resolution} images smaller than {resolution} px on the short side (they will be upscaled)"
            )
        if self.long_captions:
            out.append(
                f"{len(self.long_captions)} captions longer than {CLIP_MAX_TOKENS} tokens (the trainer truncates them), "
                f"e.g. {self.long_captions[0][:80]!r}"
            )
        if self.several_captions:
            out.append(
                f"{self.several_captions} images with several captions (the trainer draws one per example and epoch)"
            )
        if self.masks:
            out.append(f"{self.masks} masks (white = learn)")
        if self.alpha_kept:
            out.append(f"{self.alpha_kept} images with transparency kept as RGBA (--keep_alpha)")
        if self.report.counts:
            out.append(self.report.summary())
        if self.skipped:
            out.append(f"{self.skipped} invalid entries skipped")
        return out


def _fmt(size: tuple[int, int] | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "-"


def collect_captions(images_dir: Path, captions_file: Path | None) -> tuple[dict[Path, list[str]], str]:
    """Find the captions (one or several per image): the JSON (or .jsonl) file if it exists, else
    metadata.jsonl, else .txt files."""
    if captions_file is not None and captions_file.exists():
        if captions_file.suffix == ".jsonl":
            return read_caption_lists_jsonl(captions_file), str(captions_file)
        return read_caption_lists_json(captions_file), str(captions_file)
    if (images_dir / "metadata.jsonl").is_file():
        return read_caption_lists_jsonl(images_dir / "metadata.jsonl"), str(images_dir / "metadata.jsonl")
    captions = read_caption_lists_txt(images_dir)
    if captions:
        return captions, f".txt files in {images_dir}"
    where = f"{captions_file}" if captions_file else "no --captions_file"
    raise UserError(
        f"{where}: not found, and {images_dir} has no metadata.jsonl or .txt captions; "
        "run generate_captions.py first or pass --captions_file"
    )


def _match_absolute(path: Path, images_dir: Path) -> Path:
    """An absolute path written on another machine (the original toolkit's format): match by name."""
    if path.is_absolute() and not path.exists() and (images_dir / path.name).exists():
        return images_dir / path.name
    return path


def pair_examples(
    images_dir: Path, captions: Mapping[Path, str | list[str]], source: str
) -> tuple[list[Example], list[str]]:
    """Pair every image with its caption (or captions); return the pairs and one line per problem found."""
    images_dir = images_dir.resolve()
    images = {p.resolve() for p in find_images(images_dir)}
    problems, examples, captioned = [], [], set()
    for raw_path, entry in captions.items():
        path = _match_absolute(Path(raw_path), images_dir).resolve()
        captioned.add(path)
        texts = [c.strip() for c in ([entry] if isinstance(entry, str) else entry)]
        if not path.is_relative_to(images_dir):
            problems.append(
                f"{source}: {raw_path} is outside {images_dir}; move the image into --images_dir or fix the path"
            )
        elif not path.exists():
            problems.append(
                f"{source}: caption for {raw_path}, which does not exist; add the image or remove the entry"
            )
        elif not any(texts):
            problems.append(f"{source}: empty caption for {path}; write one or remove the entry")
        elif not all(texts):
            n = texts.index("") + 1
            problems.append(
                f"{source}: caption {n} of {len(texts)} for {path} is empty; write it or remove it from the list"
            )
        else:
            examples.append(Example(path, tuple(texts)))
    for image in sorted(images - captioned):
        problems.append(f"{image}: no caption in {source}; add one or move the image out of --images_dir")
    examples.sort(key=lambda e: str(e.image_path))
    return examples, problems


def pair_masks(examples: list[Example], masks_dir: Path, images_dir: Path) -> tuple[list[Example], list[str]]:
    """Give each example the mask named like its image (same file stem, anywhere under masks_dir), as the
    trainer's --mask_dir matches them; return the examples that have one and a line per problem: an image
    without a mask, a mask without an image, two masks of one name."""
    if not masks_dir.is_dir():
        raise UserError(f"{masks_dir}: not a folder; pass --masks_dir with the folder that holds the masks")
    masks, problems = {}, []
    for mask in find_images(masks_dir):
        if mask.stem in masks:
            problems.append(
                f"{mask}: a second mask for images named {mask.stem!r} (the first is {masks[mask.stem]}); keep one"
            )
        else:
            masks[mask.stem] = mask
    paired = []
    for example in examples:
        mask = masks.get(example.image_path.stem)
        if mask is None:
            problems.append(
                f"{example.image_path}: no mask named like it in {masks_dir}; add one (white = learn) "
                "or move the image out of --images_dir"
            )
        else:
            paired.append(replace(example, mask_path=mask))
    image_names = {p.stem for p in find_images(images_dir)}
    problems += [
        f"{mask}: a mask without an image of its name in {images_dir}; remove it or add the image"
        for stem, mask in masks.items()
        if stem not in image_names
    ]
    return paired, problems


def _keeps_original_bytes(path: Path, loaded: LoadedImage) -> bool:
    """True when the file decodes to 8-bit RGB as it is, so its bytes are the dataset's RGB image."""
    return (
        loaded.source_mode == "RGB"
        and not loaded.notes
        and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )


def _mask_problem(example: Example, size: tuple[int, int] | None) -> str | None:
    """Why the example's mask cannot be used (unreadable, or not `size`: its image's upright size), or None."""
    try:
        mask_size = _load_mask(example).size
    except InvalidImageError as e:
        return str(e)
    if size is not None and mask_size != size:
        return (
            f"{example.mask_path}: {_fmt(mask_size)}, but its image {example.image_path} is {_fmt(size)} "
            "(upright); make the mask the image's size"
        )
    return None


def check_examples(
    examples: list[Example],
    skip_invalid: bool = False,
    background: tuple[int, int, int] = WHITE,
    tokenizer=None,
    resolution: int | None = None,
    known_problems: list[str] | None = None,
    keep_alpha: bool = False,
) -> tuple[list[CheckedExample], Summary]:
    """Decode every image (and mask) and list all problems together; stop unless skip_invalid. Holds no
    pixels. With keep_alpha an image with transparency is to be stored as RGBA, not composited."""
    problems = list(known_problems or [])
    summary = Summary()
    checked = []
    for example in examples:
        try:
            loaded = load_image(example.image_path, background=background)
        except InvalidImageError as e:
            loaded = None
            problems.append(str(e))
        # A mask is checked even when its image is not: every problem is listed in one run.
        size = loaded.image.size if loaded else None
        mask_problem = _mask_problem(example, size) if example.mask_path else None
        if mask_problem:
            problems.append(mask_problem)
        if loaded is None or mask_problem:
            continue
        alpha = keep_alpha and "transparency" in loaded.notes
        summary.add(example, loaded, alpha, tokenizer, resolution)
        checked.append(
            CheckedExample(
                example.image_path,
                example.captions,
                _keeps_original_bytes(example.image_path, loaded),
                _stat(example.image_path),
                alpha,
                example.mask_path,
                _stat(example.mask_path) if example.mask_path else None,
            )
        )
    report_problems(
        problems,
        "problems listed above; fix them, or pass --skip_invalid to build from the rest",
        fatal=not skip_invalid,
    )
    summary.skipped = len(problems)
    if not checked:
        raise UserError("no usable image-caption pairs; check --images_dir and --captions_file")
    return checked, summary


def build_dataset(
    examples: list[Example],
    output: Path,
    overwrite: bool = False,
    skip_invalid: bool = False,
    background: tuple[int, int, int] = WHITE,
    tokenizer=None,
    resolution: int | None = None,
    known_problems: list[str] | None = None,
    keep_alpha: bool = False,
) -> Summary:
    """Check every image, then write the dataset to output: `check_examples` then `write_dataset`."""
    checked, summary = check_examples(
        examples, skip_invalid, background, tokenizer, resolution, known_problems, keep_alpha
    )
    write_dataset(checked, output, overwrite, background)
    return summary
