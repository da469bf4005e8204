"""Turn images/ + image_captions.json into a Hugging Face dataset (image + text columns, + mask).

    python create_dataset.py                      # -> datasets/Text2Image_example
    python create_dataset.py --images_dir photos --captions_file photos/metadata.jsonl --dataset_name mine
    python create_dataset.py --images_dir photos --masks_dir masks --dataset_name masked

Captions come from --captions_file (image_captions.json, or a metadata.jsonl); if it does not exist,
from metadata.jsonl in --images_dir, else from kohya-style .txt files beside the images. An image may
have several captions (a JSON list of strings, or one per line of its .txt file): then `text` is a list
column and the trainer draws one caption per example and epoch.
--masks_dir DIR   a grayscale mask per image (same file name stem, anywhere under DIR; white = learn),
                  stored in a `mask` column: train with --masked_loss --mask_column mask.
--keep_alpha      store images with transparency as RGBA instead of compositing them on --background:
                  train with --masked_loss --alpha_mask (the trainer composites them on its own
                  --background when it decodes them).

With --push_to_hub the Hub is checked (online, token, dataset id) before any image is read, and a
failed upload keeps the dataset on disk and prints the command that pushes it later.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import UserError, run_cli
from sdlora.fileio import check_writable
from sdlora.images import parse_color

if TYPE_CHECKING:
    from sdlora.dataset_writer import CheckedExample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images_dir", default="images", help="folder of images (searched recursively)")
    p.add_argument(
        "--captions_file", default="image_captions.json", help="image_captions.json or a metadata.jsonl"
    )
    p.add_argument(
        "--dataset_name", default="Text2Image_example", help="name of the dataset folder / Hub dataset"
    )
    p.add_argument(
        "--output_dir", default="datasets", help="the dataset is saved to <output_dir>/<dataset_name>"
    )
    p.add_argument(
        "--save_to_disk", action=argparse.BooleanOptionalAction, default=True, help="save the dataset to disk"
    )
    p.add_argument("--push_to_hub", action="store_true", help="also push the dataset to the Hugging Face Hub")
    p.add_argument(
        "--hub_dataset_id", default=None, help="Hub dataset id (default: <user_name>/<dataset_name>)"
    )
    p.add_argument("--user_name", default=None, help="Hub user name, used when --hub_dataset_id is not given")
    p.add_argument(
        "--hub_token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument(
        "--skip_invalid", action="store_true", help="build from the valid pairs, skipping listed problems"
    )
    p.add_argument("--background", default="white", help="colour that transparent images are composited on")
    p.add_argument(
        "--masks_dir",
        "--mask_dir",
        default=None,
        help="folder of grayscale masks named like the images (white = learn), written as a `mask` column",
    )
    p.add_argument(
        "--keep_alpha",
        action="store_true",
        help="store images with transparency as RGBA (for the trainer's --alpha_mask), not composited on --background",
    )
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="model whose tokenizer counts caption tokens and whose native size is the resolution (default: built-in tiny model)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="report images smaller than this (default: the model's native size)",
    )
    args = p.parse_args(argv)
    if not args.save_to_disk and not args.push_to_hub:
        p.error("nothing to do: pass --save_to_disk or --push_to_hub")
    if args.push_to_hub and not (args.hub_dataset_id or args.user_name):
        p.error("--push_to_hub needs --hub_dataset_id or --user_name")
    return args


def load_tokenizer_and_resolution(args: argparse.Namespace):
    """The tokenizer that counts caption tokens, and the resolution small images are judged against."""
    from sdlora.models import load_tokenizer, native_resolution, resolve_model

    try:
        model = resolve_model(args.pretrained_model_name_or_path)
        return load_tokenizer(model), args.resolution or native_resolution(model)
    except UserError as e:
        print(f"warning: no caption token count ({e})")
        return None, args.resolution


def free_path(path: Path) -> Path:
    """path if nothing is there, else the first free path-unpushed-N beside it: never replace a folder."""
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-unpushed-{n}"), n + 1
    return candidate


def push_without_saving(
    checked: list[CheckedExample],
    output: Path,
    repo_id: str,
    token: str | None,
    background: tuple[int, int, int],
) -> str:
    """Write the dataset to a temporary folder beside output and push it; if the push fails, keep it on disk."""
    from sdlora.dataset_writer import write_dataset
    from sdlora.hub import push_dataset_or_explain

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", suffix=".push", dir=output.parent) as tmp:
        staged = Path(tmp) / output.name
        write_dataset(checked, staged, background=background)
        return push_dataset_or_explain(staged, repo_id, token, keep_at=free_path(output))


def main(args: argparse.Namespace) -> None:
    from sdlora.dataset_builder import check_examples, collect_captions, pair_examples, pair_masks
    from sdlora.dataset_writer import write_dataset
    from sdlora.hub import check_hub_ready, push_dataset_or_explain

    output = Path(args.output_dir) / args.dataset_name
    if args.save_to_disk and output.exists() and not args.overwrite:
        raise UserError(
            f"{output}: already exists; pass --overwrite to replace it or choose another --dataset_name"
        )
    # Before anything is read or asked of the Hub: a read-only or full disk costs one line, not a wait.
    # (Also without --save_to_disk: the dataset to push is staged beside where it would be saved.)
    check_writable(output.parent, "--output_dir")
    background = parse_color(args.background)
    repo_id = None
    if args.push_to_hub:  # before any image is read: offline, logged out or a bad id costs one line
        repo_id = check_hub_ready(
            args.hub_dataset_id or f"{args.user_name}/{args.dataset_name}", args.hub_token, "dataset"
        )
    images_dir = Path(args.images_dir)
    captions, source = collect_captions(images_dir, Path(args.captions_file) if args.captions_file else None)
    examples, problems = pair_examples(images_dir, captions, source)
    if args.masks_dir:
        examples, mask_problems = pair_masks(examples, Path(args.masks_dir), images_dir)
        problems += mask_problems
    tokenizer, resolution = load_tokenizer_and_resolution(args)
    checked, summary = check_examples(
        examples, args.skip_invalid, background, tokenizer, resolution, problems, args.keep_alpha
    )
    print(f"captions from {source}")
    for line in summary.lines(resolution):
        print(line)
    if args.save_to_disk:
        write_dataset(checked, output, args.overwrite, background)
        print(f"saved {len(checked)} examples to {output}")
        if repo_id:
            print(f"pushed to {push_dataset_or_explain(output, repo_id, args.hub_token)}")
    elif repo_id:
        print(f"pushed to {push_without_saving(checked, output, repo_id, args.hub_token, background)}")


if __name__ == "__main__":
    run_cli(main, parse_args())
