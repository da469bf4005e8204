"""Pretrain `tiny-shapes`: a tiny SD 1.x-shaped model that draws the shapes world (sdlora/shapes.py).

    OMP_NUM_THREADS=1 python -m sdlora.pretrain_shapes --output_dir sdlora/assets/tiny-shapes --seed 0

Stages: the VAE (8x, like SD's, so 64 px pictures are 8x8 latents), then the UNet on cached latents,
then scores of the saved pipeline on captions of new seeds. The text encoder is a frozen random CLIP:
training it jointly changed nothing measurable (shared/NOTES.md). Deterministic for a seed and a
thread count (matmul reductions are split by thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .shapes import (
    HELD_OUT_SHAPES,
    SIZE,
    TRAIN_SHAPES,
    TRIGGER,
    caption,
    random_polygon,
    render,
    render_array,
    sample_scene,
    scene_rng,
    scenes,
)
from .shapes_eval import (
    GUIDANCE_SCALE,
    HELD_OUT_SEED,
    eval_prompts,
    held_out_rates,
    pixels,
    rates,
    sample_and_score,
    to_uint8,
)
from .shapes_model import (
    MAX_TOKENS,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    make_pipeline,
    save_pipeline,
)
from .shapes_score import score


@dataclass(frozen=True)
class VaeRecipe:
    """VAE training: random 32 px crops first (4x cheaper, the convs do not care), then whole pictures."""

    steps_crops: int = 700
    steps_full: int = 450
    batch_crops: int = 32
    batch_full: int = 16
    lr: float = 2e-3  # (NOTES: at 5e-4 it reached 19.6 dB where 2e-3 reached 27 dB in the same time)
    warmup: int = 50
    kl_weight: float = 1e-6  # SD's; the latents are rescaled to unit variance after training anyway
    latent_channels: int = 8
    polygon_every: int = 3  # every third picture a random polygon


@dataclass(frozen=True)
class UnetRecipe:
    """UNet training on `dataset_size` fixed scenes, encoded once (the VAE is frozen by then)."""

    steps: int = 1500  # (measured: 98% shape, 88% colour, 92% background by step 1000 of a first run)
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    snr_gamma: float | None = 5.0  # min-SNR weighting (Hang et al. 2023): faster convergence
    dataset_size: int = 16384
    polygon_every: int = 4  # every fourth picture a random polygon, "a red shape on a blue background"
    eval_every: int = 500
    eval_samples: int = 48


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae: VaeRecipe = field(default_factory=VaeRecipe)
    unet: UnetRecipe = field(default_factory=UnetRecipe)
    guidance_scale: float = GUIDANCE_SCALE
    inference_steps: int = 20


# --- VAE ------------------------------------------------------------------------------------------


def examples(seed: int, start: int, count: int, polygon_every: int) -> tuple[np.ndarray, list[str]]:
    """Training pictures start .. start + count - 1 (uint8 (N, 64, 64, 3)) and their captions: scenes of
    the in-distribution shapes, every `polygon_every`-th a random polygon instead."""
    images, captions = [], []
    for i in range(start, start + count):
        if i % polygon_every == polygon_every - 1:
            image, text = random_polygon(np.random.default_rng([seed, i, 2]))
        else:
            scene = sample_scene(scene_rng(seed, i))
            image, text = render(scene), caption(scene)
        images.append(np.asarray(image))
        captions.append(text)
    return np.stack(images), captions


def vae_batch(seed: int, step: int, batch: int, crop: int | None, polygon_every: int) -> torch.Tensor:
    """Batch `step` of VAE training, randomly cropped to `crop` px."""
    # (A VAE that saw only circles, squares and triangles blurred small hearts into blobs: 75% of
    # held-out shapes recognisable in its reconstructions against 100% in distribution.)
    images = pixels(examples(seed, step * batch, batch, polygon_every)[0])
    if crop is None:
        return images
    rng = np.random.default_rng([seed, step, 1])  # (a stream of its own: scene streams are [seed, index])
    corners = rng.integers(0, SIZE - crop + 1, size=(batch, 2))
    return torch.stack([im[:, y : y + crop, x : x + crop] for im, (y, x) in zip(images, corners)])


def train_vae(vae, recipe: VaeRecipe, seed: int, log) -> None:
    """L1 + MSE reconstruction and a little KL; AdamW, a short warm-up, then a cosine decay over both phases.

    (Measured, 300 steps on crops: L1 alone sat on a plateau near 0.43 mean error, as the prototype's did
    for its first ~500 steps; L1 + MSE with a 50-step warm-up was at 0.15.)"""
    total = recipe.steps_crops + recipe.steps_full
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / recipe.warmup) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    vae.train()
    for step in range(total):
        crops = step < recipe.steps_crops
        batch = recipe.batch_crops if crops else recipe.batch_full
        x = vae_batch(seed, step, batch, 32 if crops else None, recipe.polygon_every)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = reconstruction - x
        loss = error.abs().mean() + error.pow(2).mean() + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == total:
            log(f"vae step {step + 1}/{total}: l1 {error.abs().mean().item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations (N, C, 8, 8) of uint8 pictures."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(pixels(images[i : i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_report(vae, seed: int, count: int = 256) -> dict:
    """PSNR and scores of VAE reconstructions of new in-distribution and held-out-shape renders."""
    from .shapes import HELD_OUT_SHAPES, SHAPES

    report = {}
    for name, shapes in (
        ("in_distribution", TRAIN_SHAPES),
        ("all_shapes", SHAPES),
        ("held_out", HELD_OUT_SHAPES),
    ):
        scenes_ = scenes(seed, count, shapes)
        images = render_array(scenes_)
        x = pixels(images)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((y - x) / 2).pow(2).mean().item()
        decoded = to_uint8(y)
        scores = score(list(decoded), [caption(s) for s in scenes_])
        report[name] = {"psnr": round(-10 * math.log10(mse), 2), **rates(scores)}
    return report


# --- UNet -----------------------------------------------------------------------------------------


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """(N, MAX_TOKENS, D) last hidden states, as the pipeline conditions the UNet."""
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    return text_encoder(ids.input_ids)[0]


def train_unet(
    unet, latents, embeddings, caption_index, empty, scheduler, recipe: UnetRecipe, seed, evaluate, log
):
    """v-prediction MSE with min-SNR weights on random batches of the cached latents; returns the EMA UNet.

    latents: (mean, std) of the posteriors, already scaled; embeddings: (K, T, D) of the K distinct
    captions, caption_index[i] the caption of scene i; empty: (T, D) of the empty caption."""
    mean, std = latents
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / recipe.warmup))
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    start = time.perf_counter()
    for step in range(recipe.steps):
        idx = torch.randint(0, len(mean), (recipe.batch,), generator=generator)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)  # (B, C, 8, 8)
        cond = embeddings[caption_index[idx]]
        drop = torch.rand(recipe.batch, generator=generator) < recipe.caption_dropout
        cond = torch.where(drop[:, None, None], empty[None], cond)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(noisy, t, cond).sample
        weights = (
            torch.ones_like(snr[t])
            if recipe.snr_gamma is None
            else snr[t].clamp(max=recipe.snr_gamma) / (snr[t] + 1)
        )
        loss = (weights * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten fast
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if (step + 1) % 100 == 0:
            log(
                f"unet step {step + 1}/{recipe.steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)"
            )
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            log(f"unet step {step + 1}: {evaluate(ema)}")
    return ema


# --- Scores and the pipeline ----------------------------------------------------------------------


def write_model_card(output_dir: Path, report: dict, threads: int) -> None:
    """README.md: what the model is, the command that made it (`threads`: its OMP_NUM_THREADS) and what it scored."""
    final = ", ".join(f"{k} {v:.0%}" for k, v in report["final"].items())
    held_out = ", ".join(f"{k} {v:.0%}" for k, v in report["held_out_shape_rates"].items())
    text = f"""# tiny-shapes

A tiny Stable Diffusion 1.x-shaped model (CLIP text encoder, 8x AutoencoderKL with
{report["recipe"]["vae"]["latent_channels"]} latent channels, cross-attention UNet at every level, DDIM
with zero terminal SNR, v-prediction and trailing timesteps) pretrained from scratch on the shapes world
of sdlora/shapes.py: {", ".join(TRAIN_SHAPES)} and random polygons ("shape") in the palette's colours.
{", ".join(HELD_OUT_SHAPES)} were never drawn: they are for LoRA demos (trigger word `{TRIGGER}`).

Made by `OMP_NUM_THREADS={threads} python -m sdlora.pretrain_shapes --output_dir DIR --seed {report["recipe"]["seed"]}`
in {sum(report["times"].values()) / 60:.0f} min on one CPU core (stages, seconds: {report["times"]}).

Scores on {report["eval_samples"]} new in-distribution captions, {report["recipe"]["inference_steps"]} steps
of the saved scheduler, guidance {report["recipe"]["guidance_scale"]}: {final}.
Held-out shapes drawn for their trigger prompts: {held_out}.
"""
    (output_dir / "README.md").write_text(text, encoding="utf-8")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    recipe = Recipe(
        seed=args.seed,
        vae=VaeRecipe(steps_crops=args.vae_steps_crops, steps_full=args.vae_steps_full),
        unet=UnetRecipe(
            steps=args.unet_steps, lr=args.unet_lr, batch=args.unet_batch, dataset_size=args.dataset_size
        ),
        guidance_scale=args.guidance_scale,
    )
    output_dir = Path(args.output_dir)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    times = {}
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, recipe.seed + 2)
    scheduler = build_scheduler()

    t0 = time.perf_counter()
    vae = build_vae(recipe.seed + 1, recipe.vae.latent_channels)
    train_vae(vae, recipe.vae, recipe.seed + 100, log)
    times["vae_s"] = round(time.perf_counter() - t0)
    log(f"vae: {vae_report(vae, HELD_OUT_SEED)}")

    t0 = time.perf_counter()
    images, captions = examples(recipe.seed + 200, 0, recipe.unet.dataset_size, recipe.unet.polygon_every)
    mean, std = encode(vae, images)
    scaling = float(1 / mean.std())  # unit-variance latents, as SD's 0.18215 gives its VAE's
    vae.register_to_config(scaling_factor=scaling)
    distinct = sorted(set(captions))
    embeddings = encode_captions(tokenizer, text_encoder, distinct)
    empty = encode_captions(tokenizer, text_encoder, [""])[0]
    caption_index = torch.tensor([distinct.index(c) for c in captions])
    times["encode_s"] = round(time.perf_counter() - t0)
    log(f"encoded {len(images)} pictures ({len(distinct)} captions); scaling factor {scaling:.4f}")

    t0 = time.perf_counter()
    unet = build_unet(recipe.seed + 3, recipe.vae.latent_channels, text_encoder.config.hidden_size)
    prompts = eval_prompts(recipe.unet.eval_samples)

    def evaluate(ema) -> dict:
        pipe = make_pipeline(vae, text_encoder, tokenizer, ema, scheduler)
        return rates(sample_and_score(pipe, prompts, recipe.inference_steps, recipe.guidance_scale))

    ema = train_unet(
        unet, (mean * scaling, std * scaling), embeddings, caption_index, empty, scheduler, recipe.unet,
        recipe.seed + 300, evaluate, log,
    )  # fmt: skip
    times["unet_s"] = round(time.perf_counter() - t0)

    pipe = make_pipeline(vae, text_encoder, tokenizer, ema, scheduler)
    save_pipeline(pipe, output_dir)
    t0 = time.perf_counter()
    final = sample_and_score(
        pipe, eval_prompts(args.eval_samples), recipe.inference_steps, recipe.guidance_scale
    )
    times["score_s"] = round(time.perf_counter() - t0)
    held_out = held_out_rates(pipe, args.eval_samples // 2, recipe.inference_steps, recipe.guidance_scale)
    report = {
        "recipe": asdict(recipe),
        "times": times,
        "final": rates(final),
        "eval_samples": args.eval_samples,
        "held_out_shape_rates": held_out,
    }
    (output_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(output_dir, report, args.threads)
    log(
        f"final ({args.eval_samples} samples, {recipe.inference_steps} steps, guidance {recipe.guidance_scale}): {report['final']}"
    )
    log(f"held-out shapes drawn for trigger prompts (must be rare: nothing taught them): {held_out}")
    log(f"stage times: {times}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="where the diffusers folder is saved")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data and noise")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument(
        "--vae_steps_crops", type=int, default=VaeRecipe.steps_crops, help="VAE steps on 32 px crops"
    )
    parser.add_argument(
        "--vae_steps_full", type=int, default=VaeRecipe.steps_full, help="VAE steps on 64 px pictures"
    )
    parser.add_argument("--unet_steps", type=int, default=UnetRecipe.steps, help="UNet steps")
    parser.add_argument("--unet_lr", type=float, default=UnetRecipe.lr, help="UNet peak learning rate")
    parser.add_argument("--unet_batch", type=int, default=UnetRecipe.batch, help="UNet batch size")
    parser.add_argument(
        "--dataset_size", type=int, default=UnetRecipe.dataset_size, help="pictures the UNet trains on"
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=Recipe.guidance_scale, help="guidance for scores"
    )
    parser.add_argument("--eval_samples", type=int, default=96, help="samples of the final score")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
