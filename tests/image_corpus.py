"""Builds, with PIL, every kind of image file users bring: good ones in odd formats and bad ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(size=(80, 64), colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def odd_but_valid(folder: Path) -> dict[str, Path]:
    """Files that must load as upright 8-bit RGB: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, image, **kw):
        files[name] = folder / name
        image.save(files[name], **kw)

    save("cmyk.jpg", _rgb().convert("CMYK"))
    save("gray16.png", Image.fromarray((np.arange(80 * 64).reshape(64, 80) * 12).astype(np.uint16)))
    save("gray.png", _rgb().convert("L"))
    save("palette.png", _rgb().convert("P", palette=Image.ADAPTIVE))
    rgba = _rgb().convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent: must come out as the background
    save("rgba.png", rgba)
    la = _rgb().convert("LA")
    la.putalpha(128)
    save("la.png", la)
    p = Image.new("P", (80, 64), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    save("palette_transparent.png", p, transparency=0)
    frames = [_rgb(colour=(0, 0, 255)), _rgb(colour=(0, 255, 0))]
    files["animated.gif"] = folder / "animated.gif"
    frames[0].save(files["animated.gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    # EXIF orientation 6: stored 80x64, to be shown rotated 90 degrees clockwise, i.e. 64x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", _rgb(), exif=exif.tobytes())
    return files


def invalid(folder: Path) -> dict[str, Path]:
    """Files that must be rejected by name: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    files["truncated.png"] = folder / "truncated.png"
    files["truncated.png"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    files["truncated.jpg"] = folder / "truncated.jpg"
    files["truncated.jpg"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["empty.png"] = folder / "empty.png"
    files["empty.png"].write_bytes(b"")
    files["text.jpg"] = folder / "text.jpg"
    files["text.jpg"].write_text("this is not an image\n")
    # A decompression bomb: a tiny file that claims to be 20000 x 20000 pixels (a 1-bit image).
    files["bomb.png"] = folder / "bomb.png"
    Image.new("1", (20000, 20000)).save(files["bomb.png"])
    return files
