"""Images + captions -> a Hugging Face `datasets.Dataset` with `image` and `text` columns."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from .captions import read_captions_json, read_metadata_jsonl, read_txt_captions
from .errors import UserError
from .fileio import atomic_directory
from .images import ImageReport, InvalidImageError, find_images, load_image, report_problems

CLIP_MAX_TOKENS = 77


@dataclass
class Example:
    image_path: Path
    caption: str


@dataclass
class Summary:
    count: int = 0
    min_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    smaller_than_resolution: int = 0
    long_captions: list[str] = field(default_factory=list)
    skipped: int = 0
    report: ImageReport = field(default_factory=ImageReport)

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
        if self.report.counts:
            out.append(self.report.summary())
        if self.skipped:
            out.append(f"{self.skipped} invalid entries skipped")
        return out


def _fmt(size: tuple[int, int] | None) -> str:
    return f"{size[0]}x{size[1]}" if size else "-"


def collect_captions(images_dir: Path, captions_file: Path | None) -> tuple[dict[Path, str], str]:
    """Find the captions: the JSON (or .jsonl) file if it exists, else metadata.jsonl, else .txt files."""
    if captions_file is not None and captions_file.exists():
        if captions_file.suffix == ".jsonl":
            return read_metadata_jsonl(captions_file), str(captions_file)
        return read_captions_json(captions_file), str(captions_file)
    if (images_dir / "metadata.jsonl").is_file():
        return read_metadata_jsonl(images_dir / "metadata.jsonl"), str(images_dir / "metadata.jsonl")
    captions = read_txt_captions(images_dir)
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
    images_dir: Path, captions: dict[Path, str], source: str
) -> tuple[list[Example], list[str]]:
    """Pair every image with its caption; return the pairs and one line per problem found."""
    images_dir = images_dir.resolve()
    images = {p.resolve() for p in find_images(images_dir)}
    problems, examples, captioned = [], [], set()
    for raw_path, caption in captions.items():
        path = _match_absolute(Path(raw_path), images_dir).resolve()
        captioned.add(path)
        if not path.is_relative_to(images_dir):
            problems.append(
                f"{source}: {raw_path} is outside {images_dir}; move the image into --images_dir or fix the path"
            )
        elif not path.exists():
            problems.append(
                f"{source}: caption for {raw_path}, which does not exist; add the image or remove the entry"
            )
        elif not caption.strip():
            problems.append(f"{source}: empty caption for {path}; write one or remove the entry")
        else:
            examples.append(Example(path, caption.strip()))
    for image in sorted(images - captioned):
        problems.append(f"{image}: no caption in {source}; add one or move the image out of --images_dir")
    examples.sort(key=lambda e: str(e.image_path))
    return examples, problems


def _image_bytes(path: Path, loaded) -> bytes:
    """The original file when it decodes to the same RGB pixels, else a lossless PNG of the normalised image."""
    if not loaded.notes and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        return path.read_bytes()
    buffer = io.BytesIO()
    loaded.image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_dataset(
    examples: list[Example],
    skip_invalid: bool = False,
    background: tuple[int, int, int] = (255, 255, 255),
    tokenizer=None,
    resolution: int | None = None,
    known_problems: list[str] | None = None,
):
    """Decode every image, then make the Dataset; all problems are listed together, not one at a time."""
    import datasets

    problems = list(known_problems or [])
    summary = Summary()
    rows = {"image": [], "text": []}
    for example in examples:
        try:
            loaded = load_image(example.image_path, background=background)
        except InvalidImageError as e:
            problems.append(str(e))
            continue
        w, h = loaded.image.size
        summary.count += 1
        summary.report.add(loaded)
        summary.min_size = min(summary.min_size or (w, h), (w, h), key=lambda s: s[0] * s[1])
        summary.max_size = max(summary.max_size or (w, h), (w, h), key=lambda s: s[0] * s[1])
        if resolution and min(w, h) < resolution:
            summary.smaller_than_resolution += 1
        if tokenizer is not None and len(tokenizer(example.caption).input_ids) > CLIP_MAX_TOKENS:
            summary.long_captions.append(example.caption)
        rows["image"].append(
            {"bytes": _image_bytes(example.image_path, loaded), "path": example.image_path.name}
        )
        rows["text"].append(example.caption)
    report_problems(
        problems,
        "problems listed above; fix them, or pass --skip_invalid to build from the rest",
        fatal=not skip_invalid,
    )
    summary.skipped = len(problems)
    if not rows["image"]:
        raise UserError("no usable image-caption pairs; check --images_dir and --captions_file")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features), summary


def save_dataset(dataset, output: Path, overwrite: bool) -> None:
    """Save to disk through a temporary folder, so a failure leaves nothing half-written."""
    with atomic_directory(output, overwrite=overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
