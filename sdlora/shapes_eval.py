"""How well a shapes model draws what it is asked (the scores of sdlora/shapes_score.py over generated images):
the targets tiny-shapes is held to, the held-out prompts, and sampling with fixed seeds."""

from __future__ import annotations

import numpy as np
import torch

from .shapes import HELD_OUT_SHAPES, TRIGGER, caption, demo_scenes, scenes
from .shapes_score import score

HELD_OUT_SEED = 10_000  # scenes of this seed are never trained on: for scores
# What tiny-shapes must draw on new in-distribution captions (20 steps of its own scheduler, this guidance).
TARGETS = {"shape": 0.90, "colour": 0.85, "background": 0.70}
GUIDANCE_SCALE = 5.0


def rates(scores: dict) -> dict:
    return {k: round(scores[k], 4) for k in ("shape", "colour", "background")}


@torch.no_grad()
def sample_and_score(
    pipe,
    prompts: list[str],
    steps: int = 20,
    guidance_scale: float = GUIDANCE_SCALE,
    seed: int = 0,
    batch: int = 48,
) -> dict:
    """Images for prompts (image i from seed + i) scored against them."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators
        ).images
    return score(images, prompts) | {"images": images}


def held_out_rates(pipe, count: int, steps: int = 20, guidance_scale: float = GUIDANCE_SCALE) -> dict:
    """For each held-out shape, how often trigger prompts of it ("a red sks star on ...") draw it."""
    found = {}
    for shape in HELD_OUT_SHAPES:
        prompts = [caption(s, TRIGGER) for s in demo_scenes(shape, count, HELD_OUT_SEED)]
        drawn = sample_and_score(pipe, prompts, steps, guidance_scale)
        found[shape] = round(drawn["shape"], 4)
    return found


def eval_prompts(count: int, seed: int = HELD_OUT_SEED) -> list[str]:
    """Captions of new in-distribution scenes: never trained on."""
    return [caption(s) for s in scenes(seed, count)]


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as the VAE takes pictures."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """The inverse of pixels: float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)


@torch.no_grad()
def vae_ceiling(vae, shape: str, count: int = 64, seed: int = HELD_OUT_SEED) -> float:
    """How often the VAE's reconstruction of a render of `shape` is still a clean `shape` to the scorer:
    the most a LoRA of the UNet alone can reach (it can only ask the decoder for latents)."""
    from .shapes import render_array
    from .shapes_score import predict, shape_rate

    x = pixels(render_array(demo_scenes(shape, count, seed)))
    decoded = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return shape_rate(predict(list(decoded)), shape)
