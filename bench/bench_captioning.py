"""Images per second of the captioning loop on the tiny models, by batch size, and the loop's own overhead.

    python bench/bench_captioning.py                       # CPU, batch 1 and 8, greedy, 20 new tokens

Measures sdlora.captioning.caption_images end to end (image loading, preprocessing, the model, atomic
saves) after one warm-up batch, on tiny BLIP-2, BLIP, ViT-GPT2, Florence-2, LLaVA (a vision-language model
asked through its chat template) and a WD tagger in ONNX (needs onnxruntime, onnx and onnxscript). The
text models have random weights and must write exactly --max_new_tokens tokens, which makes runs
comparable. The "loop only" row runs a captioner that returns a fixed string: what loading, saving and
the loop cost per image without a model. The numbers show per-token and per-batch overheads and what
batching saves, not the speed of the real models.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.caption_output import open_caption_output  # noqa: E402
from sdlora.captioner_families import GenerationSettings  # noqa: E402
from sdlora.captioning import caption_images, load_captioner  # noqa: E402
from sdlora.sample_data import SAMPLES, draw_sample  # noqa: E402
from sdlora.tiny_captioners import TINY_SAVERS, save_tiny_captioners  # noqa: E402
from sdlora.tiny_taggers import EXPORT_NEEDS, can_export  # noqa: E402


class FixedCaption:
    """A captioner that looks at nothing: the loop's cost (loading, saving) without a model."""

    kind = "none"

    def caption(self, images: list) -> list[str]:
        return ["a picture"] * len(images)

    def describe(self) -> str:
        return "no model"


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


def images_per_second(captioner, paths: list[Path], output_file: Path, batch_size: int) -> float:
    warmup = open_caption_output("json", paths[0].parent, output_file.with_suffix(".warmup.json"))
    caption_images(captioner, paths[:batch_size], warmup, batch_size=batch_size)
    output = open_caption_output("json", paths[0].parent, output_file)
    return caption_images(captioner, paths, output, batch_size=batch_size).images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--num_images", type=int, default=32, help="images captioned per measurement")
    parser.add_argument("--num_beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="tokens generated per caption")
    parser.add_argument("--models", nargs="+", choices=list(TINY_SAVERS), default=None, help="default: all")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()

    kinds = tuple(args.models or TINY_SAVERS)
    if "wd-tagger" in kinds and not (can_export() and importlib.util.find_spec("onnxruntime")):
        print(f"(no tagger row: it needs onnxruntime, {' and '.join(EXPORT_NEEDS)})")
        kinds = tuple(kind for kind in kinds if kind != "wd-tagger")
    settings = GenerationSettings(
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = save_tiny_captioners(tmp / "models", kinds=kinds)
        paths = write_images(tmp / "images", args.num_images)
        print(
            f"{args.num_images} images, num_beams {args.num_beams}, max_new_tokens {args.max_new_tokens}, "
            f"device {args.device}, {torch.get_num_threads()} torch threads\n"
        )
        print("| model | " + " | ".join(f"batch {b} (img/s)" for b in args.batch_sizes) + " |")
        print("|---|" + "---:|" * len(args.batch_sizes))
        rows = [("loop only (no model)", FixedCaption())]
        rows += [
            (f"tiny {kind}", load_captioner(str(path), args.device, generation=settings))
            for kind, path in models.items()
        ]
        for name, captioner in rows:
            rates = [
                images_per_second(captioner, paths, tmp / f"{name.replace(' ', '_')}-{b}.json", b)
                for b in args.batch_sizes
            ]
            print(f"| {name} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
