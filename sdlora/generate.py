"""Generate images with a trained LoRA, without Jupyter: the same code path as inference.ipynb.

    python -m sdlora.generate --lora_path output/tiny-lora --prompts "a red circle on a white background"

--lora_path takes a training output folder, a checkpoint-N folder, a .safetensors file (ours or kohya/A1111)
or the original toolkit's pytorch_lora_weights.bin. Images go to <output_dir>/<prompt-slug>/image_<i>.png,
numbered on after earlier results; the settings of each prompt are appended to <output_dir>/generations.jsonl.
"""

from __future__ import annotations

import argparse

from .devices import DTYPES
from .errors import run_cli
from .generation import (
    check_generation_settings,
    generate_and_save,
    load_pipeline,
    read_prompts,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdlora.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base_model",
        default=None,
        help="Hub id or local diffusers folder (default: the model the LoRA was trained on, if it is here; else the built-in tiny model)",
    )
    p.add_argument(
        "--lora_path",
        default=None,
        help="training output folder, checkpoint-N folder or LoRA file (default: none, the base model alone)",
    )
    p.add_argument(
        "--lora_scale", type=float, default=1.0, help="LoRA strength; 0 = the base model alone (default: 1.0)"
    )
    p.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        help="one or more prompts, or prompts files (one per line, JSON or TOML); kohya's per-prompt options --n --w --h --d --l --s",
    )
    p.add_argument("--negative_prompt", default=None, help="negative prompt for every prompt (default: none)")
    p.add_argument("--num_images", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--num_inference_steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument(
        "--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)"
    )
    p.add_argument("--seed", type=int, default=42, help="image i of each prompt uses seed + i (default: 42)")
    p.add_argument(
        "--height", type=int, default=None, help="multiple of 8 (default: the model's native size)"
    )
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--output_dir", default="results", help="where the images go (default: results)")
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1, mps or cpu (default: cuda if there is a GPU, else cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="weights and compute dtype (default: float16 on CUDA, float32 elsewhere)",
    )
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    prompts = read_prompts(args.prompts)
    check_generation_settings(args.num_images, args.num_inference_steps, args.height, args.width)
    pipe, lora = load_pipeline(args.base_model, args.lora_path, args.device, args.dtype)
    print(f"{pipe.name_or_path} on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')})", flush=True)
    print(
        f"{lora.describe()}, scale {args.lora_scale}" if lora else "no LoRA: the base model alone", flush=True
    )
    results = generate_and_save(
        pipe,
        prompts,
        args.output_dir,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        lora=lora,
        lora_scale=args.lora_scale,
    )
    for result in results:
        print(f"{result.prompt!r}: {', '.join(str(p) for p in result.paths)}", flush=True)


if __name__ == "__main__":
    run_cli(main, parse_args())
