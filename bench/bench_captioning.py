"""Images per second of the captioning loop on the tiny BLIP-2, BLIP and ViT-GPT2 models, by batch size.

    python bench/bench_captioning.py                       # CPU, batch 1 and 8, greedy, 20 new tokens

Measures sdlora.captioning.caption_images end to end (image loading, preprocessing, generation,
atomic saves) after one warm-up batch. The tiny models have random weights, so they rarely stop
early: every caption runs to --max_new_tokens, which makes runs comparable. The numbers show the
per-token overhead of generation and what batching saves, not the speed of a real BLIP-2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.captioning import caption_images, load_captioner, open_caption_output  # noqa: E402
from sdlora.sample_data import SAMPLES, draw_sample  # noqa: E402
from sdlora.tiny_captioners import save_tiny_captioners  # noqa: E402


def write_images(folder: Path, count: int) -> list[Path]:
    """count sample pictures (the toolkit's sample shapes, repeated) as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        _, size, background, shape, colour, _ = SAMPLES[i % len(SAMPLES)]
        path = folder / f"{i:04d}.png"
        draw_sample(size, background, shape, colour).save(path)
        paths.append(path)
    return paths


def images_per_second(captioner, paths: list[Path], output_file: Path, batch_size: int, args) -> float:
    generate = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    warmup = open_caption_output("json", paths[0].parent, output_file.with_suffix(".warmup.json"))
    caption_images(captioner, paths[:batch_size], warmup, batch_size=batch_size, **generate)
    output = open_caption_output("json", paths[0].parent, output_file)
    return caption_images(captioner, paths, output, batch_size=batch_size, **generate).images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--num_images", type=int, default=32, help="images captioned per measurement")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="tokens generated per caption")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = save_tiny_captioners(tmp / "models")
        paths = write_images(tmp / "images", args.num_images)
        print(
            f"{args.num_images} images, num_beams {args.num_beams}, max_new_tokens {args.max_new_tokens}, "
            f"device {args.device}, {torch.get_num_threads()} torch threads\n"
        )
        print("| model | " + " | ".join(f"batch {b} (img/s)" for b in args.batch_sizes) + " |")
        print("|---|" + "---:|" * len(args.batch_sizes))
        for kind, path in models.items():
            captioner = load_captioner(str(path), device=args.device)
            rates = [
                images_per_second(captioner, paths, tmp / f"{kind}-{b}.json", b, args)
                for b in args.batch_sizes
            ]
            print(f"| tiny {kind} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
