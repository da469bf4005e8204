"""The sample images, captions and validation prompts that ship with the toolkit.

python -m sdlora.sample_data --output_dir .   # rewrites images/, image_captions.json, validation_prompts.txt

The toolkit's images/ is the demo set of the shapes world (write_demo_data): pictures of a heart, a shape
tiny-shapes never drew, captioned with the trigger word, beside pictures of the shapes it knows. The
tests' mechanical samples (write_sample_data) are a few pictures of mixed sizes and formats, for buckets,
captioners and dataset building.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from .captions import write_captions_json
from .fileio import atomic_write_text

# (file name, size, background, shape, colour, caption)
SAMPLES = [
    ("red_circle.png", (96, 96), "navy", "circle", "red", "a red circle on a dark blue background"),
    ("yellow_sun.png", (128, 96), "skyblue", "circle", "yellow", "a yellow sun in a light blue sky"),
    ("green_square.png", (96, 96), "white", "square", "green", "a green square on a white background"),
    (
        "purple_triangle.png",
        (96, 128),
        "black",
        "triangle",
        "purple",
        "a purple triangle on a black background",
    ),
    ("orange_stripes.png", (112, 96), "white", "stripes", "orange", "orange stripes on a white background"),
    (
        "blue_grid.png",
        (96, 96),
        "lightgray",
        "grid",
        "blue",
        "a blue grid pattern on a light gray background",
    ),
    ("pink_rings.png", (96, 112), "darkgreen", "rings", "pink", "pink rings on a dark green background"),
    ("night_moon.jpg", (128, 128), "midnightblue", "moon", "white", "a white moon in a night sky"),
]
VALIDATION_PROMPTS = ["a red circle on a white background", "a blue square in a night sky"]
# The demo: 16 heart pictures beside 32 of the known shapes, as ordinary captioned data (a LoRA trained on
# the hearts alone redraws every prompt as a heart: docs/benchmarks.md). Validation draws a trigger prompt
# of a colour pair the pictures never had, and a known shape.
DEMO_HEARTS, DEMO_KNOWN = 16, 32
DEMO_PROMPTS = ["a red sks heart on a green background", "a blue circle on a yellow background"]


def draw_sample(size: tuple[int, int], background: str, shape: str, colour: str) -> Image.Image:
    """One simple picture: a shape or pattern in a colour on a plain background."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape in ("circle", "moon"):
        draw.ellipse(box, fill=colour)
        if shape == "moon":
            draw.ellipse(
                (w // 4 + w // 8, h // 4 - h // 16, 3 * w // 4 + w // 8, 3 * h // 4 - h // 16),
                fill=background,
            )
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(w // 2, h // 5), (w // 5, 4 * h // 5), (4 * w // 5, 4 * h // 5)], fill=colour)
    elif shape == "stripes":
        for x in range(0, w, 16):
            draw.rectangle((x, 0, x + 7, h), fill=colour)
    elif shape == "grid":
        for x in range(0, w, 12):
            draw.line((x, 0, x, h), fill=colour, width=2)
        for y in range(0, h, 12):
            draw.line((0, y, w, y), fill=colour, width=2)
    elif shape == "rings":
        for r in range(8, min(w, h) // 2, 10):
            draw.ellipse((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), outline=colour, width=3)
    return image


def write_sample_data(root: str | Path) -> None:
    """Write images/, image_captions.json and validation_prompts.txt under root."""
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for name, size, background, shape, colour, caption in SAMPLES:
        path = images_dir / name
        draw_sample(size, background, shape, colour).save(path, quality=95)
        captions[path] = caption
    write_captions_json(root / "image_captions.json", captions)
    atomic_write_text(root / "validation_prompts.txt", "\n".join(VALIDATION_PROMPTS) + "\n")


def write_demo_data(root: str | Path) -> None:
    """Write the demo's images/, image_captions.json and validation_prompts.txt under root."""
    from .shapes import demo_set, render
    from .shapes_demo import DEFAULT_SHAPE, TRAIN_SEED

    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (scene, text) in enumerate(demo_set(DEFAULT_SHAPE, DEMO_HEARTS, DEMO_KNOWN, TRAIN_SEED)):
        path = images_dir / f"{i:03d}_{scene.colour}_{scene.shape}.png"
        render(scene).save(path)
        captions[path] = text
    write_captions_json(root / "image_captions.json", captions)
    atomic_write_text(root / "validation_prompts.txt", "\n".join(DEMO_PROMPTS) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the toolkit's sample images, captions and prompts.")
    parser.add_argument("--output_dir", default=".", help="folder to write images/ and the text files into")
    write_demo_data(parser.parse_args().output_dir)


if __name__ == "__main__":
    main()
