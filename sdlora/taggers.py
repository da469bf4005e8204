"""Booru taggers: SmilingWolf's WD v1.4 and v3 models in ONNX, scoring a fixed list of Danbooru tags per image.

A tagger folder (or Hub repository) holds `model.onnx` and `selected_tags.csv` (tag_id,name,category,count,
one row per model output; category 9 = rating, 4 = character, 0 = general). Images are prepared as the
models were trained (SmilingWolf's wd-tagger demo, kohya's tag_images_by_wd14_tagger.py): padded to a
centred square on white, resized to the model's input size, RGB turned to BGR, NHWC float32 in 0..255.

onnxruntime is an optional dependency, imported only when a tagger is loaded; its CUDA provider (the
onnxruntime-gpu package) is used when installed and the device allows.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .captioner_families import TAGGER_FILES, load_error, model_file
from .errors import UserError

RATING, GENERAL, CHARACTER = 9, 0, 4
# Tags that are faces made of underscores: replacing those would break them. The list of the WD tagger
# WebUI extension and SmilingWolf's demo; kohya keeps any tag of 3 characters or fewer (^_^, o_o) as is.
KAOMOJIS = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)
INSTALL = "pip install onnxruntime (or onnxruntime-gpu for a CUDA GPU)"


@dataclass(frozen=True)
class TagSettings:
    """Which tags a tagger writes and how they are joined."""

    general_threshold: float = 0.35  # kohya's default for both
    character_threshold: float = 0.35
    undesired_tags: tuple[str, ...] = ()  # never written; raw names or with spaces for underscores
    replace_underscores: bool = False
    include_rating: bool = False  # the most likely of general / sensitive / questionable / explicit, first
    separator: str = ", "


@dataclass(frozen=True)
class TagList:
    """selected_tags.csv: the tag each model output scores, and its category."""

    names: tuple[str, ...]
    categories: np.ndarray  # (T,) int


def split_tags(text: str) -> tuple[str, ...]:
    """A comma-separated list of tags as a tuple, without empty entries or surrounding spaces."""
    return tuple(tag.strip() for tag in text.split(",") if tag.strip())


def display_name(name: str, replace_underscores: bool) -> str:
    """The tag as written into captions: underscores become spaces if asked, except in kaomoji."""
    if replace_underscores and name not in KAOMOJIS and len(name) > 3:
        return name.replace("_", " ")
    return name


def read_selected_tags(path: str | Path) -> TagList:
    """Read selected_tags.csv; a UserError naming the file if it does not have the expected columns."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
            raise ValueError(
                f"the header is {rows[0] if rows else 'missing'}, not tag_id,name,category,count"
            )
        names = tuple(row[1] for row in rows[1:])
        categories = np.array([int(row[2]) for row in rows[1:]], dtype=np.int64)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: not a tagger's selected_tags.csv ({e})") from None
    return TagList(names, categories)


def select_tags(scores: np.ndarray, tags: TagList, settings: TagSettings) -> list[str]:
    """The tags to write for one image's scores (T,): the rating if asked, then the character and general
    tags scoring at least their threshold, most confident first (ties in the file's order)."""
    undesired = set(settings.undesired_tags)
    shown = [display_name(name, settings.replace_underscores) for name in tags.names]

    def wanted(i: int) -> bool:
        return tags.names[i] not in undesired and shown[i] not in undesired

    thresholds = np.full(len(tags.names), np.inf)  # other categories (artist, meta) are never written
    thresholds[tags.categories == GENERAL] = settings.general_threshold
    thresholds[tags.categories == CHARACTER] = settings.character_threshold
    chosen = sorted((i for i in np.flatnonzero(scores >= thresholds) if wanted(i)), key=lambda i: -scores[i])
    ratings = np.flatnonzero(tags.categories == RATING)
    if settings.include_rating and ratings.size:
        best = int(ratings[np.argmax(scores[ratings])])  # one rating: the likeliest, as kohya and the demo do
        chosen = [best, *chosen] if wanted(best) else chosen
    return [shown[i] for i in chosen]


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as the tagger's input: (size, size, 3) float32 BGR in 0..255, padded square on white."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)  # what SmilingWolf's demo resizes with
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR: the models were trained on BGR


@dataclass
class WDTagger:
    """A loaded ONNX tagger: its session, input size, tag list and settings."""

    session: object  # onnxruntime.InferenceSession
    input_name: str
    size: int
    fixed_batch: int | None  # an exported batch size the model must be run with, else None
    tags: TagList
    settings: TagSettings
    kind: str = "wd-tagger"

    def describe(self) -> str:
        return f"onnxruntime {self.session.get_providers()[0]}, {self.size}x{self.size} input"

    def scores(self, images: list) -> np.ndarray:
        """The model's raw scores, (B, T), for PIL RGB images."""
        batch = np.stack([prepare_image(image, self.size) for image in images])  # (B, size, size, 3)
        step = self.fixed_batch or len(images)
        parts = []
        for start in range(0, len(images), step):
            part = batch[start : start + step]
            filler = np.zeros((step - len(part), *part.shape[1:]), np.float32)  # a model exported for batch N
            parts.append(
                self.session.run(None, {self.input_name: np.concatenate([part, filler])})[0][: len(part)]
            )
        return np.concatenate(parts)

    def caption(self, images: list) -> list[str]:
        """One tag list per image, joined with the separator."""
        return [
            self.settings.separator.join(select_tags(row, self.tags, self.settings))
            for row in self.scores(images)
        ]


def import_onnxruntime():
    """onnxruntime, or a one-line UserError with the pip command when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"booru taggers run on onnxruntime, which is not installed; {INSTALL}") from None
    return onnxruntime


def onnx_providers(device: str, available: list[str]) -> list:
    """Execution providers for a --device: CUDA when asked or auto and installed, with the CPU behind it."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and (device == "auto" or device.startswith("cuda")):
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise UserError(
            f"--device {device}: onnxruntime has no CUDA provider here; pip install onnxruntime-gpu"
        )
    if device != "auto":
        raise UserError(f"--device {device}: taggers run on auto, cpu or cuda[:N]")
    return ["CPUExecutionProvider"]


def load_tagger(name_or_path: str, device: str = "auto", settings: TagSettings | None = None) -> WDTagger:
    """Load a WD tagger (model.onnx + selected_tags.csv) from a folder or Hub id."""
    ort = import_onnxruntime()
    onnx_file, tags_file = (model_file(name_or_path, name) for name in TAGGER_FILES)
    if onnx_file is None or tags_file is None:
        raise UserError(f"{name_or_path}: not a tagger (needs {' and '.join(TAGGER_FILES)})")
    tags = read_selected_tags(tags_file)
    providers = onnx_providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(onnx_file), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise load_error(name_or_path, "ONNX tagger", e) from None
    model_input = session.get_inputs()[0]
    shape = model_input.shape  # NHWC; the batch is a name when it is dynamic
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
        raise UserError(f"{onnx_file}: input shape {shape} is not a WD tagger's [batch, size, size, 3]")
    outputs = session.get_outputs()[0].shape[-1]
    if outputs != len(tags.names):
        raise UserError(
            f"{tags_file}: {len(tags.names)} tags for a model with {outputs} outputs; re-download both"
        )
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return WDTagger(session, model_input.name, shape[1], fixed, tags, settings or TagSettings())
