"""Caption every image in a folder with BLIP-2, BLIP or ViT-GPT2, for LoRA training.

    python generate_captions.py --images_dir images --output_file image_captions.json

Writes image_captions.json (image path -> caption, paths relative to the file's folder), or with
--format jsonl an imagefolder metadata.jsonl in the images folder, or with --format txt a caption
file beside each image. Captions already in the output are kept and their images skipped, so an
interrupted run picks up where it stopped; --overwrite captions everything again. Offline, or to try
it in seconds, build tiny random-weight models and pass one:

    python -m sdlora.tiny_captioners --output_dir models/tiny-captioners
    python generate_captions.py --model_name_or_path models/tiny-captioners/blip --output_file /tmp/captions.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.captioning import (
    PROMPT_KINDS,
    Captioner,
    CaptionOutput,
    CaptionRun,
    caption_images,
    captioner_kind,
    load_captioner,
    open_caption_output,
)
from sdlora.captions import CAPTION_FORMATS
from sdlora.devices import DTYPES
from sdlora.errors import UserError, run_cli
from sdlora.images import find_images, parse_color


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Caption a folder of images with BLIP-2, BLIP or ViT-GPT2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images_dir", default="images", help="folder of images, searched recursively")
    parser.add_argument(
        "--output_file",
        default=None,
        help="captions file; default image_captions.json for --format json, <images_dir>/metadata.jsonl for jsonl "
        "(not used with txt)",
    )
    parser.add_argument(
        "--model_name_or_path",
        default="Salesforce/blip2-opt-2.7b",
        help="BLIP-2, BLIP (e.g. Salesforce/blip-image-captioning-large) or ViT-GPT2 "
        "(nlpconnect/vit-gpt2-image-captioning) Hub id or local folder; the family is read from its config",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images captioned per forward pass")
    parser.add_argument("--num_beams", type=int, default=5, help="beam search width; 1 is greedy decoding")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="longest caption, in tokens")
    parser.add_argument(
        "--min_new_tokens",
        type=int,
        default=1,
        help="shortest caption, in tokens; at least 1 keeps the model from ending before it starts",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="text the caption continues, for BLIP-2 and BLIP (e.g. 'a photography of'); left out of the caption",
    )
    parser.add_argument(
        "--prefix", default="", help="trigger words put before every caption, e.g. 'sks dog,'"
    )
    parser.add_argument("--suffix", default="", help="words put after every caption")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, float32 on the CPU"
    )
    parser.add_argument(
        "--format", default="json", choices=CAPTION_FORMATS, help="json, imagefolder jsonl, or txt"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="caption again images that already have a caption"
    )
    parser.add_argument(
        "--background", default="white", help="colour behind transparent images: a name, #rrggbb or r,g,b"
    )
    parser.add_argument(
        "--save_every", type=int, default=1, help="batches between atomic writes of the captions file"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot work, with the change to make; turn --background into RGB."""
    for flag in ("batch_size", "num_beams", "max_new_tokens", "save_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UserError(f"--min_new_tokens {args.min_new_tokens}: must be between 0 and --max_new_tokens")
    if args.format == "txt" and args.output_file:
        raise UserError(
            "--output_file is not used with --format txt (captions go beside the images); leave it out"
        )
    args.background = parse_color(args.background)


def check_prompt(prompt: str | None, kind: str, model: str) -> None:
    """Refuse --prompt for a model that cannot take one, before loading it."""
    if prompt and kind not in PROMPT_KINDS:
        raise UserError(f"--prompt: {model} ({kind}) takes no text prompt; leave it out")


def print_summary(run: CaptionRun, where: str) -> None:
    print(
        f"captioned {run.generated} images in {run.seconds:.1f}s ({run.images_per_second:.2f} images/s) into {where}"
    )
    if run.empty:
        print(
            f"{len(run.empty)} of them got an empty caption, not written (try other --num_beams or --prompt):"
        )
        print("".join(f"  {path}\n" for path in run.empty), end="")
    if run.unreadable:
        print(f"skipped {len(run.unreadable)} unreadable images:")
        print("".join(f"  {message}\n" for message in run.unreadable), end="")


def select_images(images: list[Path], output: CaptionOutput, overwrite: bool) -> list[Path]:
    """The images still to caption: all with --overwrite, else those without a caption in the output."""
    todo = images if overwrite else [image for image in images if not output.has(image)]
    done = len(images) - len(todo)
    print(
        f"{len(todo)} of {len(images)} images to caption ({done} already captioned in {output.describe()})",
        flush=True,
    )
    return todo


def load_model(args: argparse.Namespace) -> Captioner:
    check_prompt(args.prompt, captioner_kind(args.model_name_or_path), args.model_name_or_path)
    captioner = load_captioner(args.model_name_or_path, args.device, args.dtype)
    print(
        f"model: {args.model_name_or_path} ({captioner.kind}) on {captioner.device}, {captioner.dtype}",
        flush=True,
    )
    return captioner


def caption_with_progress(captioner: Captioner, todo: list[Path], output: CaptionOutput, args) -> CaptionRun:
    from tqdm import tqdm

    with tqdm(total=len(todo), unit="img", desc="captioning") as bar:  # shows images per second
        return caption_images(
            captioner,
            todo,
            output,
            batch_size=args.batch_size,
            save_every=args.save_every,
            background=args.background,
            prefix=args.prefix,
            suffix=args.suffix,
            progress=bar.update,
            prompt=args.prompt,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
        )


def main(args: argparse.Namespace) -> None:
    check_args(args)
    images = find_images(args.images_dir)
    output = open_caption_output(args.format, args.images_dir, args.output_file)
    todo = select_images(images, output, args.overwrite)
    if not todo:
        return
    captioner = load_model(args)
    run = caption_with_progress(captioner, todo, output, args)
    print_summary(run, output.describe())


if __name__ == "__main__":
    run_cli(main, parse_args())
