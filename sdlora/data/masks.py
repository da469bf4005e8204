"""Masks for the masked loss (kohya's --masked_loss / --alpha_mask): where the loss counts (white) and where
not (black), from a folder of grayscale images named like the training images, a dataset column, or the
image's own alpha channel. A mask goes through its image's resize, crop and flip (data.pictures) and is
averaged down to the latents' size (data.masks.latent_mask)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..images import IMAGE_EXTENSIONS
from .pictures import image_source


def _open_gray(source, name: str) -> Image.Image:
    """A mask file (or bytes) as an upright 8-bit grayscale image."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return ImageOps.exif_transpose(image).convert("L")


@dataclass(frozen=True)
class MaskSource:
    """Where each example's mask comes from: one of a folder, a dataset column, the alpha channel."""

    folder: str | None = None
    column: str | None = None
    alpha: bool = False

    def _files(self) -> dict[str, Path]:
        root = Path(self.folder)
        return {
            p.stem: p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        }

    def path_of(self, images, index: int) -> Path | str | bytes:
        """The mask's file (folder), its bytes (column) or the image itself (alpha)."""
        if self.folder:
            _, name = image_source(images.dataset[index][images.image_column])
            return self._files().get(Path(name).stem)
        value = (
            images.dataset[index][self.column] if self.column else images.dataset[index][images.image_column]
        )
        return image_source(value)[0]

    def load(self, images, index: int) -> Image.Image:
        """The mask of example `index` at its image's upright size, 8-bit grayscale (255: learn)."""
        source = self.path_of(images, index)
        if self.alpha:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image = ImageOps.exif_transpose(image)
            return image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        return _open_gray(source, str(source))

    def fingerprint(self) -> str:
        """What the masks' content depends on, for the latent cache's key: every mask file's name and bytes
        (an edited mask must not be served from a stale cache); a column or the alpha channel is in the
        dataset's own fingerprint."""
        if not self.folder:
            return f"column={self.column}" if self.column else "alpha"
        digest = hashlib.sha256()
        for stem, path in self._files().items():
            digest.update(f"{stem};{path.stat().st_size};".encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def problems(self, images, indices: list[int]) -> list[str]:
        """Every example without a usable mask (missing, unreadable, another size), and masks without an
        image, each naming the file and what to do."""
        found, problems = (self._files() if self.folder else {}), []
        used = set()
        for i in indices:
            _, name = image_source(images.dataset[i][images.image_column])
            if self.folder:
                path = found.get(Path(name).stem)
                if path is None:
                    problems.append(
                        f"{name}: no mask named like it in {self.folder}; add one (white = learn)"
                    )
                    continue
                used.add(path.stem)
            try:
                size = self.load(images, i).size
            except (OSError, ValueError, KeyError) as e:
                problems.append(f"{name}: its mask cannot be read ({e}); replace it")
                continue
            if size != images.sizes[i]:
                problems.append(
                    f"{name}: its mask is {size[0]}x{size[1]} but the image {images.sizes[i][0]}x{images.sizes[i][1]}; "
                    "make the mask the image's size"
                )
        if self.folder:
            stems = [
                p.stem
                for p in Path(self.folder).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            ]
            problems += [
                f"{self.folder}: two masks named {s!r}; keep one"
                for s in sorted({s for s in stems if stems.count(s) > 1})
            ]
            problems += [
                f"{p}: a mask without an image of its name; remove it or add the image"
                for s, p in found.items()
                if s not in used
            ]
        return problems


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, 1, H, W) pixel mask averaged down to the latents' (h, w): each latent pixel's share of white."""
    return F.interpolate(mask.float(), size=size, mode="area")
