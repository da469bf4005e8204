"""The shapes world: seeded 64 px pictures of one shape in one colour on a plain background, with captions.

The `tiny-shapes` model (sdlora/pretrain_shapes.py) is pretrained on the in-distribution shapes; the
held-out shapes are never drawn there, so a LoRA trained on `demo_scenes` shows a new concept being
learnt, and sdlora/shapes_score.py checks both. Every scene is a pure function of (seed, index).

    python -m sdlora.shapes --output_dir /tmp/star-demo --shape star --regularisation 32   # a LoRA folder
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # the tiny models' native resolution
# The corners of the RGB cube, softened a little: every pair is at least ~200 apart, so the nearest
# palette colour of a blurred or slightly off generated pixel is still the intended one.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 40, 225),
    "yellow": (235, 225, 30),
    "cyan": (30, 215, 225),
    "magenta": (215, 30, 215),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
TRAIN_SHAPES = ("circle", "square", "triangle")  # what pretraining draws
HELD_OUT_SHAPES = ("star", "heart", "cross")  # never drawn in pretraining: for LoRA demos
SHAPES = TRAIN_SHAPES + HELD_OUT_SHAPES
TRIGGER = "sks"  # the rare-token trigger word of DreamBooth-style captions
POLYGON = "shape"  # what captions call a random polygon (random_polygon)
MIN_SIDE, MAX_SIDE = 26, 50  # side of the shape's bounding box, pixels
MARGIN = 3  # the shape keeps this far from the edge, so the border shows the background
_SUPERSAMPLE = 4  # draw at 4x and average down: anti-aliased edges, as a photo or a VAE would give


@dataclass(frozen=True)
class Scene:
    """One picture: a shape of `side` pixels centred at (cx, cy), its colour and the background's."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    side: float


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene `index` of the set seeded `seed`: a pure function of both."""
    return np.random.default_rng([seed, index])


def sample_scene(rng: np.random.Generator, shapes: tuple[str, ...] = TRAIN_SHAPES) -> Scene:
    """A random scene: shape from `shapes`, two different palette colours, a size and a position inside."""
    shape = shapes[int(rng.integers(len(shapes)))]
    colour, background = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    side = float(rng.uniform(MIN_SIDE, MAX_SIDE))
    lo, hi = MARGIN + side / 2, SIZE - MARGIN - side / 2
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return Scene(shape, colour, background, cx, cy, side)


def scenes(seed: int, count: int, shapes: tuple[str, ...] = TRAIN_SHAPES, start: int = 0) -> list[Scene]:
    """Scenes start .. start + count - 1 of the set seeded `seed`."""
    return [sample_scene(scene_rng(seed, i), shapes) for i in range(start, start + count)]


def iterate_scenes(seed: int, shapes: tuple[str, ...] = TRAIN_SHAPES) -> Iterator[Scene]:
    """The endless in-distribution dataset: scene 0, 1, 2 ... of the set seeded `seed`."""
    index = 0
    while True:
        yield sample_scene(scene_rng(seed, index), shapes)
        index += 1


def _outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """The polygon of a shape in a side x side box centred at (cx, cy); None for the circle."""
    h = side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":  # five points up; inner radius 0.4 of the outer, near the regular star's 0.38
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [h if k % 2 == 0 else 0.4 * h for k in range(10)]
        # (the points reach only to 0.81 h below the centre: shift down so the star fills its box)
        dy = 0.095 * h
        return [(cx + r * math.cos(a), cy + dy + r * math.sin(a)) for a, r in zip(angles, radii)]
    if shape == "heart":  # the classic parametric heart; x spans [-16, 16], y about [-17, 12]
        ts = np.linspace(0, 2 * math.pi, 90, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        y = y - (y.max() + y.min()) / 2
        scale = h / 16
        return [(cx + scale * a, cy + scale * b) for a, b in zip(x, y)]
    if shape == "cross":  # a plus sign with arms a third of the side wide
        t = side / 6
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")


def shape_outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """The polygon a shape is drawn as in a side x side box centred at (cx, cy) (the circle as a 90-gon:
    smooth at 4x supersampling)."""
    outline = _outline(shape, cx, cy, side)
    if outline is None:
        a = np.linspace(0, 2 * math.pi, 90, endpoint=False)
        outline = list(zip(cx + side / 2 * np.cos(a), cy + side / 2 * np.sin(a)))
    return outline


def render(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image."""
    outline = shape_outline(scene.shape, scene.cx, scene.cy, scene.side)
    return render_polygon(outline, scene.colour, scene.background)


def render_polygon(outline: list[tuple[float, float]], colour: str, background: str) -> Image.Image:
    """A filled polygon (pixel coordinates) in a palette colour on a palette background, 64 x 64."""
    s = _SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), PALETTE[background])
    ImageDraw.Draw(image).polygon([(x * s, y * s) for x, y in outline], fill=PALETTE[colour])
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def random_polygon(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A random polygon (3 to 10 vertices at random angles and radii: convex or not, blunt or spiky) in
    two palette colours, and its caption "a red shape on a blue background". Pretraining draws these
    beside the named shapes, so the model learns to draw outlines in general, as a real base model can
    draw far more than it has names for, without ever drawing a held-out shape on purpose."""
    colour, background = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    side = float(rng.uniform(MIN_SIDE, MAX_SIDE))
    lo, hi = MARGIN + side / 2, SIZE - MARGIN - side / 2
    cx, cy = rng.uniform(lo, hi, size=2)
    count = int(rng.integers(3, 11))
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=count))
    radii = side / 2 * rng.uniform(0.3, 1.0, size=count)
    outline = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    return render_polygon(outline, colour, background), f"a {colour} {POLYGON} on a {background} background"


def render_array(scenes_: list[Scene]) -> np.ndarray:
    """Scenes as a uint8 array (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(s)) for s in scenes_])


def caption(scene: Scene, trigger: str | None = None) -> str:
    """ "a red circle on a blue background"; with a trigger word, "a red sks star on a blue background"."""
    shape = f"{trigger} {scene.shape}" if trigger else scene.shape
    return f"a {scene.colour} {shape} on a {scene.background} background"


@dataclass(frozen=True)
class Attributes:
    """What a caption asks for; None where it does not say."""

    shape: str | None
    colour: str | None
    background: str | None


def parse_caption(text: str) -> Attributes:
    """The shape, its colour and the background colour named in a caption made by `caption`."""
    words = text.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    if "background" in words:
        before = [w for w in words[: words.index("background")] if w in PALETTE]
        background = before[-1] if before else None
        colours = before[:-1]
    else:
        background, colours = None, [w for w in words if w in PALETTE]
    return Attributes(shape, colours[0] if colours else None, background)


def vocabulary() -> list[str]:
    """Every word the captions use, the held-out shapes and the trigger word included."""
    return ["a", "on", "background", TRIGGER, POLYGON, *COLOURS, *SHAPES]


def demo_scenes(shape: str = "star", count: int = 16, seed: int = 1) -> list[Scene]:
    """`count` scenes of one (held-out) shape in varied colours, sizes and positions."""
    return [sample_scene(scene_rng(seed, i), (shape,)) for i in range(count)]


def demo_set(
    shape: str = "star", count: int = 16, regularisation: int = 0, seed: int = 1, trigger: str = TRIGGER
) -> list[tuple[Scene, str]]:
    """A LoRA demo set of (scene, caption) pairs: `count` scenes of `shape` captioned with the trigger
    word, then `regularisation` in-distribution scenes with their plain captions. Those play DreamBooth's
    prior-preservation images: trained on alone, a LoRA redraws everything as the new shape."""
    pairs = [(s, caption(s, trigger)) for s in demo_scenes(shape, count, seed)]
    return pairs + [(s, caption(s)) for s in scenes(seed, regularisation)]


def write_image_folder(folder: str | Path, pairs: list[tuple[Scene, str]]) -> Path:
    """(scene, caption) pairs as PNGs plus a metadata.jsonl ({"file_name", "text"}): a --train_data_dir."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (scene, text) in enumerate(pairs):
        name = f"{i:03d}_{scene.colour}_{scene.shape}.png"
        render(scene).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a LoRA demo folder of one shape of the shapes world.")
    parser.add_argument("--output_dir", required=True, help="folder for the PNGs and metadata.jsonl")
    parser.add_argument("--shape", choices=SHAPES, default="star", help="the shape to teach")
    parser.add_argument("--count", type=int, default=16, help="pictures of the shape")
    parser.add_argument("--regularisation", type=int, default=0, help="in-distribution pictures beside them")
    parser.add_argument("--seed", type=int, default=1, help="seed of the scenes")
    parser.add_argument("--trigger", default=TRIGGER, help="trigger word in the shape's captions")
    args = parser.parse_args()
    pairs = demo_set(args.shape, args.count, args.regularisation, args.seed, args.trigger)
    print(write_image_folder(args.output_dir, pairs))


if __name__ == "__main__":
    main()
