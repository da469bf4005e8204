"""Images + captions -> a Hugging Face `datasets.Dataset` with `image` and `text` columns."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .captions import read_captions_json, read_metadata_jsonl, read_txt_captions
from .errors import UserError
from .fileio import atomic_directory
from .images import (
    ImageReport,
    InvalidImageError,
    LoadedImage,
    find_images,
    load_image,
    report_problems,
)

CLIP_MAX_TOKENS = 77
WHITE = (255, 255, 255)
# Arrow files of at most about 500 MB, as `save_to_disk` writes them (datasets' MAX_SHARD_SIZE).
SHARD_BYTES = 500 * 2**20
# Rows held in memory before they are written: a few dozen photos, whatever the dataset's size.
BATCH_BYTES = 16 * 2**20
# What a full or read-only disk raises while the dataset is written.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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


@dataclass
class CheckedExample:
    """An image-caption pair whose image decoded, and how the writer is to store that image."""

    image_path: Path
    caption: str
    keep_bytes: bool  # the file itself is 8-bit RGB needing no conversion: store it as it is
    stat: tuple[int, int]  # (size, mtime_ns) when checked, to notice a file changed before it is written


def _keeps_original_bytes(path: Path, loaded: LoadedImage) -> bool:
    """True when the file decodes to 8-bit RGB as it is, so its bytes are the dataset's RGB image."""
    return (
        loaded.source_mode == "RGB"
        and not loaded.notes
        and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def check_examples(
    examples: list[Example],
    skip_invalid: bool = False,
    background: tuple[int, int, int] = WHITE,
    tokenizer=None,
    resolution: int | None = None,
    known_problems: list[str] | None = None,
) -> tuple[list[CheckedExample], Summary]:
    """Decode every image and list all problems together; stop unless skip_invalid. Holds no pixels."""
    problems = list(known_problems or [])
    summary = Summary()
    checked = []
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
        keep = _keeps_original_bytes(example.image_path, loaded)
        checked.append(CheckedExample(example.image_path, example.caption, keep, _stat(example.image_path)))
    report_problems(
        problems,
        "problems listed above; fix them, or pass --skip_invalid to build from the rest",
        fatal=not skip_invalid,
    )
    summary.skipped = len(problems)
    if not checked:
        raise UserError("no usable image-caption pairs; check --images_dir and --captions_file")
    return checked, summary


def _image_bytes(example: CheckedExample, background: tuple[int, int, int]) -> bytes:
    """The original file when it is plain RGB, else a lossless PNG of the normalised RGB image."""
    if _stat(example.image_path) != example.stat:
        raise UserError(
            f"{example.image_path}: changed while the dataset was being built; run create_dataset.py again"
        )
    if example.keep_bytes:
        return example.image_path.read_bytes()
    # Decoded a second time rather than kept from the check, so memory does not grow with the image count.
    buffer = io.BytesIO()
    load_image(example.image_path, background=background).image.save(buffer, format="PNG")
    return buffer.getvalue()


def dataset_features():
    """The columns every dataset we write has, and the trainer reads: `image` and `text`."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


class _ShardWriter:
    """Rows into Arrow files of at most SHARD_BYTES, written BATCH_BYTES at a time; memory holds one batch."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[Path] = []
        self.writer = None
        self.batch: dict[str, list] = {"image": [], "text": []}
        self.batch_bytes = self.shard_bytes = 0
        # A content hash, as `Dataset.from_dict` fingerprinted the table: the trainer keys its caches
        # and resume checks on the fingerprint, so a rebuilt dataset with other pictures must not match.
        self.digest = hashlib.blake2b(digest_size=8)

    def add(self, image: bytes, name: str, caption: str) -> None:
        if self.writer is None or self.shard_bytes >= SHARD_BYTES:
            self._finish_shard()
            from datasets.arrow_writer import ArrowWriter

            self.paths.append(self.folder / f"data-{len(self.paths):05d}.arrow")
            self.writer = ArrowWriter(features=dataset_features(), path=str(self.paths[-1]))
            self.shard_bytes = 0
        for part in (caption.encode(), image, name.encode()):
            self.digest.update(len(part).to_bytes(8, "little") + part)
        self.batch["image"].append({"bytes": image, "path": name})
        self.batch["text"].append(caption)
        self.batch_bytes += len(image)
        self.shard_bytes += len(image)
        if self.batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.batch["text"]:
            self.writer.write_batch(self.batch)
        self.batch, self.batch_bytes = {"image": [], "text": []}, 0

    def _finish_shard(self) -> None:
        if self.writer is not None:
            self._flush()
            self.writer.finalize()

    def close(self) -> tuple[list[str], str]:
        """Finish the last shard; return the shard file names and the content fingerprint."""
        self._finish_shard()
        # The count is known only now: rename to the data-XXXXX-of-NNNNN.arrow names save_to_disk uses.
        names = [f"data-{i:05d}-of-{len(self.paths):05d}.arrow" for i in range(len(self.paths))]
        for path, name in zip(self.paths, names):
            os.replace(path, self.folder / name)
        return names, self.digest.hexdigest()


def write_dataset(
    checked: list[CheckedExample],
    output: Path,
    overwrite: bool = False,
    background: tuple[int, int, int] = WHITE,
) -> None:
    """Write the checked examples to output as a `datasets.load_from_disk` folder, streamed and atomic.

    Not `Dataset.from_dict(...).save_to_disk()`: that held every image in memory (0.75 MB more per
    photo, measured), and `save_to_disk` of a dataset built on disk (`Dataset.from_generator`) copies it
    through a memory map whose pages count as the process's own (+450 MB from 1,000 to 4,000 photos). The files are those `save_to_disk`
    writes: Arrow shards, `state.json` and `dataset_info.json`.
    """
    try:
        with atomic_directory(output, overwrite=overwrite) as tmp:
            _write_files(checked, tmp, background)
    except OSError as e:
        if e.errno not in _DISK_ERRORS:  # (an image that could not be read is not the output's fault)
            raise
        # atomic_directory has removed the half-written folder; a dataset already there was not touched.
        hint = "free some space or " if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(
            f"{output}: could not be written ({e.strerror}); {hint}pass another --output_dir. Nothing was changed."
        ) from None


def _write_files(checked: list[CheckedExample], folder: Path, background: tuple[int, int, int]) -> None:
    """The dataset's files in folder (Arrow shards, state.json, dataset_info.json), then read back."""
    import datasets

    shards = _ShardWriter(folder)
    for example in checked:
        shards.add(_image_bytes(example, background), example.image_path.name, example.caption)
    names, fingerprint = shards.close()
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    datasets.DatasetInfo(features=dataset_features()).write_to_directory(str(folder))
    # Read back (memory-mapped: cheap), so a change of format in `datasets` fails here, not in training.
    written = datasets.load_from_disk(str(folder))
    if len(written) != len(checked) or written.features != dataset_features():
        raise RuntimeError(f"{folder}: the dataset read back does not match what was written")
    del written  # close its memory maps before the folder is renamed


def build_dataset(
    examples: list[Example],
    output: Path,
    overwrite: bool = False,
    skip_invalid: bool = False,
    background: tuple[int, int, int] = WHITE,
    tokenizer=None,
    resolution: int | None = None,
    known_problems: list[str] | None = None,
) -> Summary:
    """Check every image, then write the dataset to output: `check_examples` then `write_dataset`."""
    checked, summary = check_examples(
        examples, skip_invalid, background, tokenizer, resolution, known_problems
    )
    write_dataset(checked, output, overwrite, background)
    return summary
