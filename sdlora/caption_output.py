"""The captions file a captioning run keeps up to date, and the caption files it reads tags from.

json: one image_captions.json; jsonl: an imagefolder metadata.jsonl; txt: a .txt file beside each image
(the formats of sdlora.captions). Captions already in the output are kept as they are; new ones are added
and the file is rewritten atomically, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .captions import (
    clean_caption,
    read_captions_json,
    read_metadata_jsonl,
    read_txt_captions,
    write_captions_json,
    write_metadata_jsonl,
    write_txt_captions,
)
from .errors import UserError


@dataclass
class CaptionOutput:
    """The captions file being written: the captions it already holds, and those not saved yet.

    Keys of `captions` are resolved paths, so the same image named two ways is one entry.
    """

    format: str
    path: Path | None  # the file, or None for txt
    images_dir: Path
    captions: dict[Path, str] = field(default_factory=dict)
    unsaved: dict[Path, str] = field(default_factory=dict)

    def describe(self) -> str:
        return str(self.path) if self.path else f".txt files beside the images in {self.images_dir}"

    def has(self, image: Path) -> bool:
        return image.resolve() in self.captions

    def add(self, image: Path, caption: str) -> None:
        self.captions[image.resolve()] = caption
        self.unsaved[image] = caption

    def save(self) -> None:
        """Write atomically (temporary file, then rename): a crash leaves the old file or the new one."""
        if not self.unsaved:
            return
        if self.format == "json":
            write_captions_json(self.path, self.captions)
        elif self.format == "jsonl":
            write_metadata_jsonl(self.path, self.captions)
        else:
            write_txt_captions(self.unsaved)  # only the new ones: the other .txt files are never touched
        self.unsaved.clear()


def _refuse_extra_columns(path: Path) -> None:
    """metadata.jsonl is rewritten with file_name and text only; refuse one with more, instead of dropping them."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        extra = sorted(set(json.loads(line)) - {"file_name", "text"}) if line.strip() else []
        if extra:
            raise UserError(
                f"{path}: line {lineno} has columns besides file_name and text ({', '.join(extra)}) that "
                "rewriting it would drop; pass another --output_file"
            )


def open_caption_output(fmt: str, images_dir: str | Path, output_file: str | Path | None) -> CaptionOutput:
    """The output for a format, with the captions already there; a malformed file is a UserError, untouched."""
    images_dir = Path(images_dir)
    if fmt == "txt":
        existing = read_txt_captions(images_dir)
        path = None
    else:
        default = "image_captions.json" if fmt == "json" else images_dir / "metadata.jsonl"
        path = Path(output_file or default)
        if path.is_dir():
            raise UserError(f"--output_file {path}: is a folder; name a file")
        existing = {}
        if path.exists():
            existing = read_captions_json(path) if fmt == "json" else read_metadata_jsonl(path)
            if fmt == "jsonl":
                _refuse_extra_columns(path)
    captions = {image.resolve(): text for image, text in existing.items()}
    return CaptionOutput(fmt, path, images_dir, captions)


def read_caption_file(path: str | Path) -> dict[Path, str]:
    """Captions from any of our formats, by resolved image path: a .json, a .jsonl, or a folder of .txt files."""
    path = Path(path)
    if path.is_dir():
        captions = read_txt_captions(path)
    elif path.suffix == ".jsonl":
        captions = read_metadata_jsonl(path)
    else:
        captions = read_captions_json(path)  # says so in one line when the file is missing or malformed
    return {image.resolve(): clean_caption(text) for image, text in captions.items()}
