"""The demo's before and after: does a LoRA teach tiny-shapes the shape of its trigger prompts?

    python -m sdlora.shapes_demo --lora_path output/tiny-lora

Draws trigger prompts of colour pairs the demo pictures never had ("a red sks heart on a green
background") and prompts of the shapes the base model knows, with the base model alone and with the LoRA
(same seeds), scores them (sdlora/shapes_score.py) and prints both; --picture writes the trigger
pictures, the base model's above the LoRA's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .shapes import HELD_OUT_SHAPES, TRIGGER, caption, demo_scenes
from .shapes_eval import GUIDANCE_SCALE, eval_prompts, sample_and_score
from .shapes_score import predict, shape_rate

# The heart, not the star: tiny-shapes' VAE gives back a clean star for only 23% of star renders (hearts
# 100%, crosses 98%), so no LoRA of its UNet can draw the star more often than that (docs/benchmarks.md).
DEFAULT_SHAPE = "heart"
# The demo pictures (images/); the new colour pairs and places prompted with; new pictures for a held-out loss.
TRAIN_SEED, EVAL_SEED, HELDOUT_SEED = 1, 2, 3
CONCEPT_GOAL = 0.6  # issue 20's concept rate for a LoRA that works
# What the printed rows mean.
EXPLAINED = {
    "concept": "trigger prompts of new colour pairs that draw a clean {shape}",
    "concept_colour": "... of those whose shape has the caption's colour",
    "concept_background": "... whose background has the caption's colour",
    "retention_shape": "prompts of the known shapes (circle, square, triangle) that draw their shape",
    "retention_colour": "... in the caption's colour",
    "retention_background": "... on the caption's background",
}


def trigger_prompts(shape: str, count: int) -> list[str]:
    """Trigger captions of new colour pairs and places: what the concept rate is scored on."""
    return [caption(s, TRIGGER) for s in demo_scenes(shape, count, EVAL_SEED)]


def measure(pipe, shape: str, count: int) -> tuple[dict, list]:
    """Concept rate on trigger prompts and shape accuracy on in-distribution prompts, and the trigger
    prompts' pictures (what `picture` shows: drawn once)."""
    drawn = sample_and_score(pipe, trigger_prompts(shape, count), guidance_scale=GUIDANCE_SCALE)
    kept = sample_and_score(pipe, eval_prompts(count), guidance_scale=GUIDANCE_SCALE)
    scores = {
        "concept": shape_rate(predict(drawn["images"]), shape),
        "concept_colour": drawn["colour"],
        "concept_background": drawn["background"],
        "retention_shape": kept["shape"],
        "retention_colour": kept["colour"],
        "retention_background": kept["background"],
    }
    return scores, drawn["images"]


def picture(rows: list[list], path: str | Path, count: int = 8) -> None:
    """A PNG of the first `count` trigger pictures of each row: the base model's above, the LoRA's below
    (measure's pictures: same prompts and seeds)."""
    from PIL import Image

    rows = [images[:count] for images in rows]
    count, size = len(rows[0]), rows[0][0].width
    grid = Image.new("RGB", (size * count, size * 2), "white")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * size, r * size))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def report(before: dict, after: dict, shape: str) -> str:
    """The table the demo prints: each score without and with the LoRA, and what it counts."""
    lines = [f"{'':22}{'base':>6}{'LoRA':>6}"]
    for key, value in after.items():
        text = EXPLAINED.get(key, "").format(shape=shape)
        lines.append(f"{key:22}{before.get(key, float('nan')):6.2f}{value:6.2f}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .generation import load_pipeline

    args = parse_args(argv)
    diffusers_logging.disable_progress_bar()  # the table is the output; no loading bars around it
    transformers_logging.disable_progress_bar()
    base, _ = load_pipeline(args.base_model)
    before, base_pictures = measure(base, args.shape, args.samples)
    tuned, _ = load_pipeline(args.base_model, args.lora_path)
    after, lora_pictures = measure(tuned, args.shape, args.samples)
    print(report(before, after, args.shape))
    print(f"({args.samples} samples a score, 20 steps, guidance {GUIDANCE_SCALE}; a LoRA that works: concept >= {CONCEPT_GOAL})")  # fmt: skip
    if args.picture:
        picture([base_pictures, lora_pictures], args.picture)
        print(f"{args.picture}: trigger prompts, the base model above, the LoRA below")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_path", required=True, help="training output folder, checkpoint-N or LoRA file")
    p.add_argument("--base_model", default="tiny-shapes", help="the shapes model the LoRA was trained on")
    p.add_argument("--shape", choices=HELD_OUT_SHAPES, default=DEFAULT_SHAPE, help="the shape taught")
    p.add_argument("--samples", type=int, default=32, help="prompts a score (one is 1/N of a rate)")
    p.add_argument("--picture", default=None, help="write the before/after trigger pictures to this PNG")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
