"""Caption files in the three formats users bring, read and written in one place.

- `image_captions.json` (the original toolkit's): one JSON object from image path to caption. The
  original wrote absolute paths; we write paths relative to the JSON file's folder and read both.
- `metadata.jsonl` (Hugging Face imagefolder): one `{"file_name": ..., "text": ...}` object per line,
  paths relative to the file's folder.
- kohya-style `.txt` files beside each image, holding its caption.

Each reader returns one caption per image; its `read_caption_lists_*` twin (create_dataset.py's) also
reads several per image: a JSON list of strings as the value or caption field, or a `.txt` file's
non-empty lines. The trainer draws one of them per example and epoch (caption_controls.pick).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import UserError
from .fileio import atomic_write_text
from .images import find_images

CAPTION_FORMATS = ("json", "jsonl", "txt")


def clean_caption(text: str) -> str:
    """One line, single spaces, no surrounding whitespace."""
    return re.sub(r"\s+", " ", text).strip()


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; check the path")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None


def _reject_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise UserError(f"{path}: {key!r} is listed twice; keep one caption per image")
            seen[key] = value
        return seen

    return hook


def _resolve(key: str, base: Path) -> Path:
    p = Path(key)
    return p if p.is_absolute() else base / p


def _caption_list(value: object, where: str, remedy: str) -> list[str]:
    """A caption field as a list of captions: a string is one; a list must hold only strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise UserError(f"{where} is not a string or a list of strings; {remedy}")


def _captions_object(path: Path) -> dict:
    """The one JSON object of an image_captions.json, keys as written."""
    text = _read_text(path, "captions file")
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates(path))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected one JSON object mapping image path to caption")
    return data


def read_captions_json(path: str | Path) -> dict[Path, str]:
    """Read image_captions.json into {image path: caption}; relative keys resolve from its folder."""
    path = Path(path)
    captions = {}
    for key, value in _captions_object(path).items():
        if not isinstance(value, str):
            raise UserError(f'{path}: the caption of {key!r} is not a string; write it as "..."')
        captions[_resolve(key, path.parent)] = value
    return captions


def read_caption_lists_json(path: str | Path) -> dict[Path, list[str]]:
    """Read image_captions.json into {image path: [captions]}: a value is a caption or a list of them."""
    path = Path(path)
    remedy = 'write it as "..." or ["...", "..."]'
    return {
        _resolve(key, path.parent): _caption_list(value, f"{path}: the caption of {key!r}", remedy)
        for key, value in _captions_object(path).items()
    }


def metadata_rows(path: str | Path):
    """(line number, row) of every non-empty line of an imagefolder metadata.jsonl; each row has a file_name."""
    path = Path(path)
    for lineno, line in enumerate(_read_text(path, "metadata file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}: invalid JSON at line {lineno} column {e.colno} ({e.msg}); fix the line"
            ) from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise UserError(
                f'{path}: line {lineno} has no "file_name"; each line needs a file_name and a caption'
            )
        yield lineno, row


def _metadata_captions(path: Path, caption_column: str):
    """(line number, image path, caption field or None) of every line; an image listed twice is an error."""
    seen: set[Path] = set()
    for lineno, row in metadata_rows(path):
        image = _resolve(row["file_name"], path.parent)
        if image in seen:
            raise UserError(
                f"{path}: {row['file_name']!r} is listed twice (line {lineno}); keep one caption per image"
            )
        seen.add(image)
        yield lineno, image, row.get(caption_column)


def read_metadata_jsonl(path: str | Path, caption_column: str = "text") -> dict[Path, str]:
    """Read an imagefolder metadata.jsonl into {image path: caption}."""
    path = Path(path)
    captions: dict[Path, str] = {}
    for lineno, image, caption in _metadata_captions(path, caption_column):
        if caption is not None and not isinstance(caption, str):
            raise UserError(f"{path}: line {lineno}: {caption_column!r} is not a string")
        captions[image] = caption if caption is not None else ""
    return captions


def read_caption_lists_jsonl(path: str | Path, caption_column: str = "text") -> dict[Path, list[str]]:
    """Read an imagefolder metadata.jsonl into {image path: [captions]}: a caption or a list of them."""
    path = Path(path)
    remedy = 'write it as "..." or ["...", "..."]'
    return {
        image: _caption_list(
            "" if caption is None else caption, f"{path}: line {lineno}: {caption_column!r}", remedy
        )
        for lineno, image, caption in _metadata_captions(path, caption_column)
    }


def read_txt_captions(images_dir: str | Path) -> dict[Path, str]:
    """Read kohya-style captions: for every image, the .txt file beside it, if any."""
    captions = {}
    for image in find_images(images_dir):
        txt = image.with_suffix(".txt")
        if txt.is_file():
            captions[image] = _read_text(txt, "caption file")
    return captions


def read_caption_lists_txt(images_dir: str | Path) -> dict[Path, list[str]]:
    """Read kohya-style captions into {image: [captions]}: each non-empty line of its .txt file is one
    (several: the trainer draws one per example and epoch); an empty file gives an empty list."""
    return {
        image: [line.strip() for line in text.splitlines() if line.strip()]
        for image, text in read_txt_captions(images_dir).items()
    }


def _relative_key(image: Path, base: Path) -> str:
    return Path(os.path.relpath(image.resolve(), base.resolve())).as_posix()


def write_captions_json(path: str | Path, captions: dict[Path, str]) -> None:
    """Write {image: caption} as image_captions.json (paths relative to its folder), atomically."""
    path = Path(path)
    data = {_relative_key(image, path.parent): text for image, text in sorted(captions.items())}
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_metadata_jsonl(path: str | Path, captions: dict[Path, str]) -> None:
    """Write {image: caption} as an imagefolder metadata.jsonl (paths relative to its folder), atomically."""
    path = Path(path)
    lines = [
        json.dumps({"file_name": _relative_key(image, path.parent), "text": text}, ensure_ascii=False)
        for image, text in sorted(captions.items())
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_txt_captions(captions: dict[Path, str]) -> None:
    """Write each caption to a .txt file beside its image, atomically."""
    for image, text in captions.items():
        atomic_write_text(Path(image).with_suffix(".txt"), text + "\n")


def read_validation_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    prompts = [line.strip() for line in _read_text(path, "prompts file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts found; write one prompt per line")
    return prompts
