"""Writing a checked dataset (dataset_builder's CheckedExample rows) as a `datasets.load_from_disk` folder:
streamed into Arrow shards, atomically, with a content fingerprint the trainer keys its caches on."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .errors import UserError
from .fileio import atomic_directory
from .images import load_image

WHITE = (255, 255, 255)
# The background a mask's transparent parts are composited on: unpainted = black = not learned.
BLACK = (0, 0, 0)
# Arrow files of at most about 500 MB, as `save_to_disk` writes them (datasets' MAX_SHARD_SIZE).
SHARD_BYTES = 500 * 2**20
# Rows held in memory before they are written: a few dozen photos, whatever the dataset's size.
BATCH_BYTES = 16 * 2**20
# What a full or read-only disk raises while the dataset is written.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass
class CheckedExample:
    """An example whose image (and mask) decoded, and how the writer is to store that image."""

    image_path: Path
    captions: tuple[str, ...]
    keep_bytes: bool  # the file itself is 8-bit RGB needing no conversion: store it as it is
    stat: tuple[int, int]  # (size, mtime_ns) when checked, to notice a file changed before it is written
    alpha: bool = False  # stored as RGBA with its transparency (--keep_alpha), not composited
    mask_path: Path | None = None
    mask_stat: tuple[int, int] | None = None


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _load_mask(example) -> Image.Image:
    """The example's mask, upright, as 8-bit grayscale (what the trainer's --mask_dir reads, through our
    loader's checks; a transparent part counts as black)."""
    name = f"{example.mask_path} (the mask of {example.image_path.name})"
    return load_image(example.mask_path, name, background=BLACK).image.convert("L")


def _check_unchanged(path: Path, stat: tuple[int, int] | None) -> None:
    if _stat(path) != stat:
        raise UserError(f"{path}: changed while the dataset was being built; run create_dataset.py again")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _with_alpha(path: Path) -> Image.Image:
    """The image as load_image reads it (first frame, upright) but RGBA with its transparency kept.
    load_image has just decoded and checked this file (and the stat check holds it unchanged); it
    composites transparency away, which --keep_alpha exists to avoid."""
    with Image.open(path) as image:
        image.seek(0)
        return ImageOps.exif_transpose(image).convert("RGBA")


def _image_bytes(example: CheckedExample, background: tuple[int, int, int]) -> bytes:
    """The original file when it is plain RGB, else a lossless PNG of the normalised RGB (or, keeping its
    transparency, RGBA) image."""
    _check_unchanged(example.image_path, example.stat)
    if example.keep_bytes:
        return example.image_path.read_bytes()
    # Decoded a second time rather than kept from the check, so memory does not grow with the image count.
    if example.alpha:
        return _png(_with_alpha(example.image_path))
    return _png(load_image(example.image_path, background=background).image)


def _mask_bytes(example: CheckedExample) -> bytes:
    """The example's mask as an 8-bit grayscale PNG at its image's size."""
    _check_unchanged(example.mask_path, example.mask_stat)
    return _png(_load_mask(example))


def dataset_features(several_captions: bool = False, masks: bool = False):
    """The columns of the datasets we write, and the trainer reads: `image` and `text` (a list of
    strings when any image has several captions), and `mask` with masks."""
    import datasets

    text = datasets.List(datasets.Value("string")) if several_captions else datasets.Value("string")
    columns = {"image": datasets.Image(), "text": text}
    if masks:
        columns["mask"] = datasets.Image()
    return datasets.Features(columns)


class _ShardWriter:
    """Rows into Arrow files of at most SHARD_BYTES, written BATCH_BYTES at a time; memory holds one batch."""

    def __init__(
        self, folder: Path, several_captions: bool = False, masks: bool = False, alpha: bool = False
    ):
        self.folder = folder
        self.features = dataset_features(several_captions, masks)
        self.paths: list[Path] = []
        self.writer = None
        self.batch: dict[str, list] = {name: [] for name in self.features}
        self.batch_bytes = self.shard_bytes = 0
        # A content hash, as `Dataset.from_dict` fingerprinted the table: the trainer keys its caches
        # and resume checks on the fingerprint, so a rebuilt dataset with other pictures must not match.
        self.digest = hashlib.blake2b(digest_size=8)
        # What only some datasets use enters first, and only when used: a plain image-text dataset keeps
        # the fingerprint it had before lists, masks and kept alpha existed (the trainer's caches hold).
        used = {"several_captions": several_captions, "masks": masks, "alpha": alpha}
        if any(used.values()):
            self._hash(json.dumps(used, sort_keys=True).encode())

    def _hash(self, *parts: bytes) -> None:
        for part in parts:
            self.digest.update(len(part).to_bytes(8, "little") + part)

    def add(
        self, image: bytes, name: str, text: str | list[str], mask: tuple[bytes, str] | None = None
    ) -> None:
        if self.writer is None or self.shard_bytes >= SHARD_BYTES:
            self._finish_shard()
            from datasets.arrow_writer import ArrowWriter

            self.paths.append(self.folder / f"data-{len(self.paths):05d}.arrow")
            self.writer = ArrowWriter(features=self.features, path=str(self.paths[-1]))
            self.shard_bytes = 0
        caption = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        self._hash(caption.encode(), image, name.encode())
        self.batch["image"].append({"bytes": image, "path": name})
        self.batch["text"].append(text)
        size = len(image)
        if mask is not None:
            self._hash(mask[0], mask[1].encode())
            self.batch["mask"].append({"bytes": mask[0], "path": mask[1]})
            size += len(mask[0])
        self.batch_bytes += size
        self.shard_bytes += size
        if self.batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.batch["text"]:
            self.writer.write_batch(self.batch)
        self.batch, self.batch_bytes = {name: [] for name in self.features}, 0

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
    Its columns follow the examples: `text` holds lists if any has several captions, `mask` if they have masks.

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

    several = any(len(e.captions) > 1 for e in checked)
    masks = any(e.mask_path is not None for e in checked)
    shards = _ShardWriter(folder, several, masks, alpha=any(e.alpha for e in checked))
    for example in checked:
        text = list(example.captions) if several else example.captions[0]
        mask = (_mask_bytes(example), example.mask_path.name) if masks else None
        shards.add(_image_bytes(example, background), example.image_path.name, text, mask)
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
    datasets.DatasetInfo(features=shards.features).write_to_directory(str(folder))
    # Read back (memory-mapped: cheap), so a change of format in `datasets` fails here, not in training.
    written = datasets.load_from_disk(str(folder))
    if len(written) != len(checked) or written.features != shards.features:
        raise RuntimeError(f"{folder}: the dataset read back does not match what was written")
    del written  # close its memory maps before the folder is renamed
