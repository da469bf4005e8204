"""Score pictures of the shapes world (sdlora/shapes.py) against the captions they were drawn for.

The colours are measured: the background is the median colour of the border, the shape's colour the
median of the pixels far from it, each snapped to the nearest palette colour. The shape is read by a
small CNN from the picture's foreground mask (colour-blind, so it needs no colour combinations in
training); its weights are committed under sdlora/assets/ and remade, deterministically for a seed and
thread count, in about a minute by

    OMP_NUM_THREADS=1 python -m sdlora.shapes_score --train_classifier   # writes sdlora/assets/shapes_classifier.safetensors
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import (
    COLOURS,
    MAX_SIDE,
    MIN_SIDE,
    PALETTE,
    SHAPES,
    SIZE,
    Scene,
    parse_caption,
    render_array,
    scene_rng,
    shape_outline,
)

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "shapes_classifier.safetensors"
_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (8, 3)
# Half the smallest distance between two palette colours (~185): a pixel further than this from the
# background is taken for the shape.
_FOREGROUND_DISTANCE = 90.0
_MIN_FOREGROUND_PIXELS = 12  # fewer than this: no shape drawn
# A picture of the world is one shape of one colour on a plain background. The classifier alone takes any
# foreground for one of its six shapes (a LoRA's scattered blobs read as stars: the first learning
# benchmark's concept rates were inflated so), so pictures that are not clean have no shape:
_MIN_PLAIN_BORDER = 0.8  # of the border pixels near the background colour
_MIN_LARGEST_PART = 0.85  # of the foreground in its largest 8-connected part
_MIN_ONE_COLOUR = 0.5  # of the foreground near its median colour
# And the foreground must be the shape the classifier names: its intersection over union with that shape's
# own outline, placed on the foreground's box. The classifier is sure (p = 1.0) of crescents and broad blobs
# a heart LoRA draws; they fit a heart at 0.39-0.57, where renders fit at 0.89 or more and tiny-shapes' own
# pictures of its known shapes at 0.78 or more (32 prompts; measured 2026-12-01).
_MIN_SHAPE_FIT = 0.65


@dataclass(frozen=True)
class Prediction:
    """What one image shows: shape, shape colour and background colour (None where nothing is drawn)."""

    shape: str | None
    colour: str | None
    background: str | None


def _nearest_colour(rgb: np.ndarray, exclude: int | None = None) -> int:
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        distances[exclude] = np.inf
    return int(distances.argmin())


def _largest_part(mask: np.ndarray) -> int:
    """Pixels in the largest 8-connected part of a boolean mask."""
    seen = np.zeros_like(mask)
    largest = 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        largest = max(largest, size)
    return largest


def is_clean(image: np.ndarray) -> bool:
    """One shape of one colour on a plain background (a float (64, 64, 3) image in 0..255)."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3)])
    border = np.concatenate([border, image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    if (np.linalg.norm(border - bg_rgb, axis=-1) <= _FOREGROUND_DISTANCE).mean() < _MIN_PLAIN_BORDER:
        return False
    far = np.linalg.norm(image - bg_rgb, axis=-1) > _FOREGROUND_DISTANCE
    if far.sum() < _MIN_FOREGROUND_PIXELS:
        return True  # nothing drawn: measure_colours says so
    fg = image[far]
    if (np.linalg.norm(fg - np.median(fg, axis=0), axis=-1) <= _FOREGROUND_DISTANCE).mean() < _MIN_ONE_COLOUR:
        return False
    return _largest_part(far) >= _MIN_LARGEST_PART * far.sum()


def _outline_mask(shape: str, cx: float, cy: float, side: float, supersample: int = 2) -> np.ndarray:
    image = Image.new("L", (SIZE * supersample, SIZE * supersample), 0)
    points = [(x * supersample, y * supersample) for x, y in shape_outline(shape, cx, cy, side)]
    ImageDraw.Draw(image).polygon(points, fill=255)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128


@functools.cache
def _box_of(shape: str) -> tuple[float, float, float, float]:
    """A shape's drawn box relative to its nominal one: height, width and centre offsets (y, x), per side."""
    side = 40.0
    ys, xs = np.nonzero(_outline_mask(shape, SIZE / 2, SIZE / 2, side))
    return (
        (ys.max() + 1 - ys.min()) / side,
        (xs.max() + 1 - xs.min()) / side,
        ((ys.max() + 1 + ys.min()) / 2 - SIZE / 2) / side,
        ((xs.max() + 1 + xs.min()) / 2 - SIZE / 2) / side,
    )


def shape_fit(mask: np.ndarray, shape: str) -> float:
    """How well a boolean foreground mask is `shape`: the best intersection over union with the shape's
    outline sized to the mask's box (its height, its width or their mean) and moved by up to a pixel."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return 0.0
    fh, fw, oy, ox = _box_of(shape)
    height, width = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
    best = 0.0
    for side in {height / fh, width / fw, (height / fh + width / fw) / 2}:
        cy = (ys.max() + 1 + ys.min()) / 2 - oy * side
        cx = (xs.max() + 1 + xs.min()) / 2 - ox * side
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                drawn = _outline_mask(shape, cx + dx, cy + dy, side)
                best = max(best, (drawn & mask).sum() / max((drawn | mask).sum(), 1))
    return float(best)


def measure_colours(image: np.ndarray) -> tuple[int, int | None, np.ndarray]:
    """(background index, shape colour index or None, soft foreground mask (64, 64) in [0, 1]) of a
    float (64, 64, 3) image in 0..255."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3)])
    border = np.concatenate([border, image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest_colour(bg_rgb)
    far = np.linalg.norm(image - bg_rgb, axis=-1) > _FOREGROUND_DISTANCE
    if far.sum() < _MIN_FOREGROUND_PIXELS:
        return background, None, np.zeros(image.shape[:2], np.float32)
    fg_rgb = np.median(image[far], axis=0)
    colour = _nearest_colour(fg_rgb, exclude=background)
    # Project each pixel on the background -> shape colour axis: 0 background, 1 shape, whatever the colours.
    axis = fg_rgb - bg_rgb
    mask = np.clip((image - bg_rgb) @ axis / max(float(axis @ axis), 1.0), 0.0, 1.0)
    return background, colour, mask.astype(np.float32)


class ShapeClassifier(torch.nn.Module):
    """Shape from a (B, 1, 64, 64) foreground mask: four stride-2 convs, global pooling (position-free)."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 2 * width, 4 * width):
            layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.SiLU()]
            channels = out
        self.features = torch.nn.Sequential(*layers)  # (B, 4w, 4, 4)
        self.head = torch.nn.Linear(channels, len(SHAPES))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(mask).mean(dim=(2, 3)))


@functools.cache
def load_classifier(path: Path = CLASSIFIER_PATH) -> ShapeClassifier:
    from safetensors.torch import load_file

    model = ShapeClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A float (64, 64, 3) array in 0..255 of a PIL image or uint8/float array (resized if not 64 px)."""
    if isinstance(image, np.ndarray):
        return image.astype(np.float32)
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def predict(images: list) -> list[Prediction]:
    """What each image (PIL or (64, 64, 3) array) shows: no shape for a picture that is not clean or whose
    foreground does not fit the shape the classifier names."""
    arrays = [to_array(image) for image in images]
    measured = [measure_colours(a) for a in arrays]
    masks = torch.from_numpy(np.stack([m for _, _, m in measured]))[:, None]  # (N, 1, 64, 64)
    with torch.no_grad():
        shapes = load_classifier()(masks).argmax(dim=1).tolist()
    return [
        Prediction(
            SHAPES[s]
            if c is not None and is_clean(a) and shape_fit(m > 0.5, SHAPES[s]) >= _MIN_SHAPE_FIT
            else None,
            COLOURS[c] if c is not None else None,
            COLOURS[b],
        )
        for (b, c, m), s, a in zip(measured, shapes, arrays)
    ]


def score(images: list, prompts: list[str]) -> dict:
    """Per-attribute rates of images drawn for prompts (captions of the shapes world).

    Returns {"shape", "colour", "background"}: the fraction of images showing what their prompt names
    (prompts that do not name an attribute are left out of its rate), "count" and "predictions" (one
    dict per image: the prompt, what it asks for and what was seen)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    predictions = predict(images)
    rates: dict = {}
    for name in ("shape", "colour", "background"):
        pairs = [(getattr(parse_caption(p), name), getattr(q, name)) for p, q in zip(prompts, predictions)]
        asked = [(want, got) for want, got in pairs if want is not None]
        rates[name] = sum(want == got for want, got in asked) / len(asked) if asked else None
    rates["count"] = len(images)
    rates["predictions"] = [
        {"prompt": p, "asked": asdict(parse_caption(p)), "seen": asdict(q)}
        for p, q in zip(prompts, predictions)
    ]
    return rates


def shape_rate(predictions: list[Prediction], shape: str) -> float:
    """Fraction of images seen as `shape`: the concept rate of a LoRA demo."""
    return sum(p.shape == shape for p in predictions) / len(predictions)


# --- Training the shape classifier ----------------------------------------------------------------


def degraded_masks(seed: int, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (N, 1, 64, 64), shape labels (N,)) of batch `index`: renders of every shape, a little
    larger and smaller than the world's, blurred and noised at random; half of them then have their
    corners rounded (blur, then a soft threshold), as a small VAE draws star points and square corners."""
    rng = scene_rng(seed, index)
    scenes_ = []
    for _ in range(count):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour, background = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        side = float(rng.uniform(0.7 * MIN_SIDE, 1.15 * MAX_SIDE))
        lo, hi = 2 + side / 2, SIZE - 2 - side / 2
        cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
        scenes_.append(Scene(shape, colour, background, cx, cy, side))
    images = torch.from_numpy(render_array(scenes_)).float().permute(0, 3, 1, 2)  # (N, 3, 64, 64)
    images = _blur(images, _uniform(rng, 0.01, 1.5, count))
    images = (
        images
        + torch.from_numpy(rng.normal(size=images.shape)).float()
        * _uniform(rng, 0, 20, count)[:, None, None, None]
    )
    masks = masks_of(images.clamp(0, 255).permute(0, 2, 3, 1).numpy())
    rounded = torch.sigmoid(
        (_blur(masks, _uniform(rng, 0.5, 2.5, count)) - _uniform(rng, 0.35, 0.65, count)[:, None, None, None])
        * _uniform(rng, 6, 20, count)[:, None, None, None]
    )
    chosen = torch.from_numpy(rng.random(count) < 0.5)[:, None, None, None]
    return torch.where(chosen, rounded, masks), torch.tensor([SHAPES.index(s.shape) for s in scenes_])


def _uniform(rng: np.random.Generator, low: float, high: float, count: int) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, size=count)).float()


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each (C, H, W) image blurred by a Gaussian of its own sigma (separable, 11 taps)."""
    x = torch.arange(-5, 6, dtype=torch.float32)
    kernels = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (N, 11)
    n, c, h, w = images.shape
    flat = images.reshape(1, n * c, h, w)
    k = kernels.repeat_interleave(c, dim=0)  # (N*C, 11)
    flat = torch.nn.functional.conv2d(
        torch.nn.functional.pad(flat, (5, 5, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c
    )
    flat = torch.nn.functional.conv2d(
        torch.nn.functional.pad(flat, (0, 0, 5, 5), mode="replicate"), k[:, None, :, None], groups=n * c
    )
    return flat.reshape(n, c, h, w)


def masks_of(images: np.ndarray) -> torch.Tensor:
    """(N, 1, 64, 64) foreground masks of float images."""
    return torch.from_numpy(np.stack([measure_colours(image)[2] for image in images]))[:, None]


def train_classifier(seed: int = 0, steps: int = 1500, batch_size: int = 64, log_every: int = 250):
    """A ShapeClassifier trained on fresh degraded masks each step (seed, step): about three minutes."""
    torch.manual_seed(seed)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        masks, labels = degraded_masks(seed, step, batch_size)
        loss = torch.nn.functional.cross_entropy(model(masks), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0:
            print(
                f"step {step + 1}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True
            )
    return model.eval()


def classifier_accuracy(model: ShapeClassifier, seed: int = 12345, count: int = 1024) -> float:
    """Accuracy on degraded masks of a seed training never uses."""
    masks, labels = degraded_masks(seed, 0, count)
    with torch.no_grad():
        return float((model(masks).argmax(dim=1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the shapes world's shape classifier.")
    parser.add_argument("--train_classifier", action="store_true", help="train and save the classifier")
    parser.add_argument("--output", default=str(CLASSIFIER_PATH), help="where to save its weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and training data")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (64 fresh images each)")
    args = parser.parse_args()
    if not args.train_classifier:
        parser.error("nothing to do: pass --train_classifier")
    from safetensors.torch import save_file

    model = train_classifier(args.seed, args.steps)
    print(f"accuracy on degraded held-out masks: {classifier_accuracy(model):.4f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
