"""The one image loader: every script that reads an image goes through `load_image`.

It rejects what cannot be decoded completely (corrupt, truncated, empty, not an image, decompression
bombs) with an `InvalidImageError` that names the file, and turns everything it accepts into an upright,
8-bit RGB picture: EXIF orientation applied, CMYK/16-bit/grayscale/palette converted, transparency
composited on a background colour, animations reduced to their first frame.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Never decode a truncated file as a partial picture (Pillow's default, stated here because other
# libraries flip this global).
ImageFile.LOAD_TRUNCATED_IMAGES = False


class InvalidImageError(UserError):
    """An image file that cannot be used; the message names the file and the remedy."""


@dataclass
class LoadedImage:
    image: Image.Image  # 8-bit RGB, upright
    notes: list[str] = field(default_factory=list)  # conversions applied: "transparency", "animated", ...
    # The decoded file's own mode ("RGB", "LA", "CMYK"...): an opaque RGBA or LA file needs no note but is
    # still not RGB, so callers that keep a file's original bytes check this too.
    source_mode: str = ""


@dataclass
class ImageReport:
    """Counts of the conversions applied over many images, for a one-line summary."""

    counts: Counter = field(default_factory=Counter)

    def add(self, loaded: LoadedImage) -> None:
        self.counts.update(loaded.notes)

    def summary(self) -> str:
        labels = {
            "transparency": "with transparency composited on the background colour",
            "animated": "animated (first frame used)",
            "exif_rotated": "rotated upright from EXIF orientation",
            "converted": "converted to 8-bit RGB",
        }
        parts = [f"{n} {labels.get(k, k)}" for k, n in sorted(self.counts.items())]
        return "; ".join(parts)


def report_problems(problems: list[str], summary: str, fatal: bool = True) -> None:
    """Print every problem on its own line (all of them, not just the first); if fatal, stop with one error."""
    for line in problems:
        print(f"invalid: {line}", file=sys.stderr)
    if problems and fatal:
        raise UserError(f"{len(problems)} {summary}")


def find_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under folder (by extension, case-insensitive), sorted for a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: not a folder of images; pass --images_dir with the folder that holds them"
        )
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def parse_color(text: str) -> tuple[int, int, int]:
    """'white', '#ffffff' or '255,255,255' -> an RGB tuple."""
    from PIL import ImageColor

    try:
        if "," in text:
            r, g, b = (int(v) for v in text.split(","))
            return (r, g, b)
        return ImageColor.getrgb(text)[:3]
    except ValueError as e:
        raise UserError(f"--background {text!r}: not a colour; use a name, #rrggbb or r,g,b") from e


def _open(source: str | Path | bytes, name: str) -> Image.Image:
    data = source if isinstance(source, bytes) else None
    if data is None:
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"{name}: file not found; check the path or remove its caption entry")
        if path.stat().st_size == 0:
            raise InvalidImageError(f"{name}: empty file (0 bytes); replace it or remove it from the folder")
        data = path.read_bytes()
    elif len(data) == 0:
        raise InvalidImageError(f"{name}: empty image data; replace the image")
    with warnings.catch_warnings():
        # A DecompressionBombWarning (over Image.MAX_IMAGE_PIXELS) is raised as an error before any
        # pixel buffer is allocated, so a bomb is refused by name instead of exhausting memory.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            Image.open(io.BytesIO(data)).verify()  # checks structure and checksums without decoding
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InvalidImageError(
                f"{name}: refused as a decompression bomb ({e}); resize the image below "
                f"{Image.MAX_IMAGE_PIXELS} pixels"
            ) from None
        except Image.UnidentifiedImageError:
            raise InvalidImageError(
                f"{name}: not an image Pillow can read; replace it or remove it from the folder"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidImageError(
                f"{name}: corrupt or truncated image ({e}); re-export or replace it"
            ) from None
    return image


def _to_rgb(image: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or 32-bit grayscale: scale to 8 bits instead of clipping (Pillow's convert("L") clips).
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else (65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0)
        arr8 = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        notes.append("converted")
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema() != (255, 255):
            notes.append("transparency")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    notes.append("converted")
    return image.convert("RGB")


def load_image(
    source: str | Path | bytes | Image.Image,
    name: str | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> LoadedImage:
    """Open, fully decode and normalise an image; raise InvalidImageError naming `name` if unusable.

    `source` is a path, the file's bytes, or an already-open PIL image (e.g. from a datasets column).
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    notes: list[str] = []
    image = source if isinstance(source, Image.Image) else _open(source, name)
    if getattr(image, "is_animated", False):
        image.seek(0)
        notes.append("animated")
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        image = ImageOps.exif_transpose(image)
        notes.append("exif_rotated")
    source_mode = image.mode
    image = _to_rgb(image, background, notes)
    if image.width < 1 or image.height < 1:
        raise InvalidImageError(f"{name}: image has no pixels; replace it")
    return LoadedImage(image=image, notes=notes, source_mode=source_mode)
