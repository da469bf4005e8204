"""Caption every image in a folder for LoRA training: BLIP-2, BLIP, ViT-GPT2, Florence-2, a vision-language
model through its chat template, or a WD booru tagger; or a sentence and tags together.

    python generate_captions.py --images_dir images --output_file image_captions.json

Writes image_captions.json (image path -> caption, paths relative to the file's folder), or with
--format jsonl an imagefolder metadata.jsonl in the images folder, or with --format txt a caption
file beside each image. Captions already in the output are kept and their images skipped, so an
interrupted run picks up where it stopped; --overwrite captions everything again. The model's family
is read from its files. Offline, or to try it in seconds, build tiny random-weight models and pass one:

    python -m sdlora.tiny_captioners --output_dir models/tiny-captioners
    python generate_captions.py --model_name_or_path models/tiny-captioners/florence2 --output_file /tmp/captions.json
    python generate_captions.py --model_name_or_path models/tiny-captioners/llava --output_file /tmp/captions.json \\
        --tagger_model_name_or_path models/tiny-captioners/wd-tagger   # "sentence, tag, tag" (needs onnxruntime)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdlora.caption_output import CaptionOutput, open_caption_output, read_caption_file
from sdlora.captioner_families import (
    FLORENCE_TASKS,
    CaptionerFamily,
    GenerationSettings,
    ImageCaptioner,
    captioner_family,
)
from sdlora.captioning import CaptionRun, CaptionText, TaggedCaptioner, caption_images, load_captioner
from sdlora.captions import CAPTION_FORMATS
from sdlora.devices import DTYPES
from sdlora.errors import UserError, run_cli
from sdlora.images import find_images, parse_color
from sdlora.taggers import TagSettings, split_tags

TAGGER_FLAGS = (
    "general_threshold",
    "character_threshold",
    "undesired_tags",
    "replace_underscores",
    "include_rating",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Caption a folder of images with BLIP-2, BLIP, ViT-GPT2, Florence-2, a vision-language model "
        "or a booru tagger.",
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
        help="Hub id or local folder of a BLIP-2, BLIP, ViT-GPT2, Florence-2 (florence-community/Florence-2-large) "
        "or image-text-to-text model (Qwen/Qwen2.5-VL-7B-Instruct, fancyfeast/llama-joycaption-beta-one-hf-llava), "
        "or a WD tagger (SmilingWolf/wd-eva02-large-tagger-v3); the family is read from its files",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images captioned per forward pass")
    gen = parser.add_argument_group("text generation (every model but the taggers)")
    gen.add_argument(
        "--num_beams",
        type=int,
        default=None,
        help="beam search width; None: 5 for BLIP-2, BLIP and ViT-GPT2, 3 for Florence-2, 1 (greedy) for VLMs",
    )
    gen.add_argument("--max_new_tokens", type=int, default=64, help="longest caption, in tokens")
    gen.add_argument(
        "--min_new_tokens",
        type=int,
        default=1,
        help="shortest caption, in tokens; at least 1 keeps the model from ending before it starts",
    )
    gen.add_argument(
        "--prompt",
        default=None,
        help="BLIP-2 and BLIP: text the caption continues (e.g. 'a photography of'), left out of the caption; "
        "VLMs: the instruction (default 'Write a one-sentence caption for this image.'; PaliGemma: 'caption en')",
    )
    gen.add_argument("--system_prompt", default=None, help="VLMs: a system message before the instruction")
    gen.add_argument(
        "--task",
        default=None,
        choices=FLORENCE_TASKS,
        help="Florence-2: a sentence, a few, or a paragraph; None: <CAPTION>",
    )
    gen.add_argument(
        "--do_sample", action="store_true", help="sample instead of searching (captions then vary run to run)"
    )
    gen.add_argument("--temperature", type=float, default=0.6, help="with --do_sample")
    gen.add_argument("--top_p", type=float, default=0.9, help="with --do_sample")
    tag = parser.add_argument_group("booru taggers (WD v1.4 / v3 ONNX; need onnxruntime)")
    tag.add_argument(
        "--general_threshold", type=float, default=0.35, help="lowest score of a general tag written"
    )
    tag.add_argument(
        "--character_threshold", type=float, default=0.35, help="lowest score of a character tag"
    )
    tag.add_argument(
        "--undesired_tags", default="", help="comma-separated tags never written, e.g. 'solo,1girl'"
    )
    tag.add_argument(
        "--replace_underscores", action="store_true", help="long_hair -> long hair (kaomoji like ^_^ kept)"
    )
    tag.add_argument("--include_rating", action="store_true", help="put the likeliest rating tag first")
    tag.add_argument("--caption_separator", default=", ", help="what joins tags, and a sentence to its tags")
    both = parser.add_argument_group("a sentence and tags together: 'sentence, tag, tag'")
    both.add_argument(
        "--tagger_model_name_or_path",
        default=None,
        help="a WD tagger run beside --model_name_or_path on every image",
    )
    both.add_argument(
        "--append_tags_from",
        default=None,
        help="tags from an earlier run's output: a .json or .jsonl file, or a folder of .txt captions",
    )
    parser.add_argument(
        "--prefix", default="", help="trigger words put before every caption, e.g. 'sks dog,'"
    )
    parser.add_argument("--suffix", default="", help="words put after every caption")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: on CUDA float16 (bfloat16 for VLMs), float32 on the CPU; taggers run as exported",
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
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UserError(f"--min_new_tokens {args.min_new_tokens}: must be between 0 and --max_new_tokens")
    for flag in ("general_threshold", "character_threshold", "top_p"):
        if not 0 <= getattr(args, flag) <= 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be between 0 and 1")
    if args.temperature <= 0:
        raise UserError(f"--temperature {args.temperature}: must be above 0")
    if args.format == "txt" and args.output_file:
        raise UserError(
            "--output_file is not used with --format txt (captions go beside the images); leave it out"
        )
    if args.tagger_model_name_or_path and args.append_tags_from:
        raise UserError(
            "--tagger_model_name_or_path and --append_tags_from: pass one source of tags, not both"
        )
    args.background = parse_color(args.background)


def check_model_flags(
    args: argparse.Namespace, family: CaptionerFamily, tagger: CaptionerFamily | None
) -> None:
    """Refuse flags the chosen models cannot take, before loading them."""
    model = f"{args.model_name_or_path} ({family.label})"
    if args.prompt and family.prompt == "none":
        hint = "; choose the caption with --task" if family.tasks else ""
        raise UserError(f"--prompt: {model} takes no text prompt; leave it out{hint}")
    if args.task and not family.tasks:
        raise UserError(f"--task: only Florence-2 takes a task, not {model}")
    if args.system_prompt and family.prompt != "instruction":
        raise UserError(f"--system_prompt: only vision-language models take one, not {model}")
    if not family.generates_text and args.num_beams is not None:
        raise UserError(f"--num_beams: {model} generates no text; leave it out")
    if tagger is not None and tagger.generates_text:
        raise UserError(
            f"--tagger_model_name_or_path {args.tagger_model_name_or_path}: a {tagger.label}, not a tagger"
        )
    if tagger is not None and not family.generates_text:
        raise UserError(
            "--tagger_model_name_or_path: --model_name_or_path is already a tagger; pass a captioner there"
        )
    defaults = parse_args([])
    changed = [flag for flag in TAGGER_FLAGS if getattr(args, flag) != getattr(defaults, flag)]
    if changed and family.generates_text and tagger is None:
        raise UserError(f"--{changed[0]}: for booru taggers, and {model} is not one; leave it out")


def generation_settings(args: argparse.Namespace, family: CaptionerFamily) -> GenerationSettings:
    return GenerationSettings(
        prompt=args.prompt or family.default_prompt,
        system_prompt=args.system_prompt,
        task=args.task or FLORENCE_TASKS[0],
        num_beams=args.num_beams or family.default_num_beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
    )


def tag_settings(args: argparse.Namespace) -> TagSettings:
    return TagSettings(
        general_threshold=args.general_threshold,
        character_threshold=args.character_threshold,
        undesired_tags=split_tags(args.undesired_tags),
        replace_underscores=args.replace_underscores,
        include_rating=args.include_rating,
        separator=args.caption_separator,
    )


def load_models(args: argparse.Namespace) -> tuple[ImageCaptioner, CaptionerFamily]:
    """The captioner (with a tagger beside it if asked), its flags checked against both families first."""
    family = captioner_family(args.model_name_or_path)
    tagger_family = (
        captioner_family(args.tagger_model_name_or_path) if args.tagger_model_name_or_path else None
    )
    check_model_flags(args, family, tagger_family)
    settings, tagging = generation_settings(args, family), tag_settings(args)
    captioner = load_captioner(args.model_name_or_path, args.device, args.dtype, settings, tagging)
    print(f"model: {args.model_name_or_path} ({captioner.kind}) on {captioner.describe()}", flush=True)
    if tagger_family is not None:
        tagger = load_captioner(args.tagger_model_name_or_path, args.device, tagging=tagging)
        print(f"tagger: {args.tagger_model_name_or_path} on {tagger.describe()}", flush=True)
        captioner = TaggedCaptioner(captioner, tagger, args.caption_separator)
    return captioner, family


def caption_text(args: argparse.Namespace) -> CaptionText:
    """Trigger words, and the tags of --append_tags_from (read before anything is written)."""
    tags = read_caption_file(args.append_tags_from) if args.append_tags_from else None
    return CaptionText(args.prefix, args.suffix, tags, args.caption_separator)


def select_images(images: list[Path], output: CaptionOutput, overwrite: bool) -> list[Path]:
    """The images still to caption: all with --overwrite, else those without a caption in the output."""
    todo = images if overwrite else [image for image in images if not output.has(image)]
    done = len(images) - len(todo)
    print(
        f"{len(todo)} of {len(images)} images to caption ({done} already captioned in {output.describe()})",
        flush=True,
    )
    return todo


def caption_with_progress(captioner, todo: list[Path], output: CaptionOutput, text, args) -> CaptionRun:
    from tqdm import tqdm

    with tqdm(total=len(todo), unit="img", desc="captioning") as bar:  # shows images per second
        return caption_images(
            captioner,
            todo,
            output,
            batch_size=args.batch_size,
            save_every=args.save_every,
            background=args.background,
            text=text,
            progress=bar.update,
        )


def print_summary(run: CaptionRun, where: str, family: CaptionerFamily, tags_file: str | None) -> None:
    print(
        f"captioned {run.generated} images in {run.seconds:.1f}s ({run.images_per_second:.2f} images/s) into {where}"
    )
    if run.empty:
        print(f"{len(run.empty)} of them got an empty caption, not written ({family.empty_hint}):")
        print("".join(f"  {path}\n" for path in run.empty), end="")
    if run.untagged:
        print(f"{len(run.untagged)} of them have no tags in {tags_file} (written without tags):")
        print("".join(f"  {path}\n" for path in run.untagged), end="")
    if run.unreadable:
        print(f"skipped {len(run.unreadable)} unreadable images:")
        print("".join(f"  {message}\n" for message in run.unreadable), end="")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    images = find_images(args.images_dir)
    output = open_caption_output(args.format, args.images_dir, args.output_file)
    text = caption_text(args)
    todo = select_images(images, output, args.overwrite)
    if not todo:
        return
    captioner, family = load_models(args)
    run = caption_with_progress(captioner, todo, output, text, args)
    print_summary(run, output.describe(), family, args.append_tags_from)


if __name__ == "__main__":
    run_cli(main, parse_args())
