"""LoRA tools: inspect, convert, resize, merge and fuse LoRA files, ours and kohya/A1111 alike.

    python -m sdlora.lora_tools info output/tiny-lora/pytorch_lora_weights.safetensors
    python -m sdlora.lora_tools convert output/tiny-lora --to kohya --output tiny-lora-kohya.safetensors
    python -m sdlora.lora_tools resize tiny-lora-kohya.safetensors --rank 2 --output tiny-lora-r2.safetensors
    python -m sdlora.lora_tools resize tiny-lora-kohya.safetensors --dynamic_method sv_fro --dynamic_param 0.9 \\
        --output tiny-lora-fro90.safetensors
    python -m sdlora.lora_tools merge a.safetensors:0.7 b.safetensors:0.5 --output ab.safetensors
    python -m sdlora.lora_tools fuse --base_model tiny --lora output/tiny-lora --scale 0.8 --output models/tiny-fused

Every command reads LoRAs through one reader (sdlora.lora_files.read_lora) and writes through the same
writers as the trainer. Outputs are written atomically and never replace an existing file without
--overwrite. More: docs/lora_tools.md.
"""

from __future__ import annotations

import argparse

import torch

from ..errors import UserError
from ..lora_files import find_lora_file, read_lora
from .files import FORMATS, WRITERS, default_format, file_format, output_path
from .fuse import fuse
from .info import describe
from .svd import DYNAMIC_METHODS, merge_weights, resize_weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdlora.lora_tools",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lora_help = "LoRA .safetensors file (ours or kohya/A1111) or a training output folder"

    info = commands.add_parser(
        "info", help="format, family, adapter type, ranks and alphas by block, metadata"
    )
    info.add_argument("file", help=lora_help)

    convert = commands.add_parser("convert", help="write a LoRA in the other format")
    convert.add_argument("file", help=lora_help)
    convert.add_argument("--to", choices=FORMATS, required=True, help="format to write")

    resize = commands.add_parser("resize", help="lower the rank of every module by SVD (kohya's resize_lora)")
    resize.add_argument("file", help=lora_help)
    resize.add_argument(
        "--rank",
        type=int,
        default=None,
        help="new rank; with --dynamic_method, the most it may keep (default: the LoRA's)",
    )
    resize.add_argument(
        "--dynamic_method",
        choices=DYNAMIC_METHODS,
        default=None,
        help="rank per module from its singular values: sv_ratio (keep those above the largest / param), "
        "sv_fro (keep param of the Frobenius norm), sv_cumulative (keep param of their sum) (default: none)",
    )
    resize.add_argument(
        "--dynamic_param",
        type=float,
        default=None,
        help="the method's target: a ratio > 1 for sv_ratio, 0..1 otherwise",
    )

    merge = commands.add_parser("merge", help="weighted sum of LoRAs for the same base model")
    merge.add_argument(
        "files", nargs="+", metavar="FILE[:WEIGHT]", help="LoRAs with their weights (default 1.0)"
    )
    merge.add_argument(
        "--rank",
        type=int,
        default=None,
        help="truncate the sum to this rank by SVD (default: ranks concatenated, exact)",
    )

    fuse_cmd = commands.add_parser(
        "fuse", help="bake a LoRA into the base model and save it as a diffusers folder"
    )
    fuse_cmd.add_argument(
        "--base_model", default=None, help="diffusers model folder or Hub id (default: built-in tiny model)"
    )
    fuse_cmd.add_argument("--lora", required=True, help=lora_help)
    fuse_cmd.add_argument("--scale", type=float, default=1.0, help="LoRA strength to bake in (default: 1.0)")
    fuse_cmd.add_argument("--output", required=True, help="folder to save the fused model to")
    fuse_cmd.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    for command in (convert, resize, merge):
        command.add_argument(
            "--output",
            required=True,
            help="file to write (.safetensors), or a folder to write it in under the usual name "
            "(pytorch_lora_weights.safetensors, or pytorch_lora_weights_kohya.safetensors)",
        )
        command.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    for command in (resize, merge):
        command.add_argument(
            "--to", choices=FORMATS, default=None, help="format to write (default: the (first) input's)"
        )
        command.add_argument(
            "--device", default="cpu", help="where to run the SVDs: cpu or cuda (default: cpu)"
        )
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if getattr(args, "rank", None) is not None and args.rank < 1:
        raise UserError(f"--rank {args.rank}: must be at least 1")
    if args.command == "resize":
        if args.rank is None and args.dynamic_method is None:
            raise UserError("resize: pass --rank N, or --dynamic_method with --dynamic_param")
        if (args.dynamic_method is None) != (args.dynamic_param is None):
            raise UserError("--dynamic_method and --dynamic_param go together: pass both or neither")
        if args.dynamic_method == "sv_ratio" and args.dynamic_param <= 1:
            raise UserError(f"--dynamic_param {args.dynamic_param}: sv_ratio takes a ratio above 1 (e.g. 20)")
        if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
            raise UserError(
                f"--dynamic_param {args.dynamic_param}: {args.dynamic_method} takes a share in (0, 1]"
            )
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU here; use --device cpu")


def _weighted(item: str) -> tuple[str, float]:
    name, colon, weight = item.rpartition(":")
    try:
        return (name, float(weight)) if colon and name else (item, 1.0)
    except ValueError:  # a colon in the path itself (C:\...)
        return item, 1.0


def _only_lora(path, weights, command: str):
    """The weights of a LoRA; UserError for a LoHa/LoKr, whose factors are no low-rank pair to take SVDs of."""
    if weights.network != "lora":
        raise UserError(
            f"{path}: a {weights.adapter_type()}: {command} works on LoRA's low-rank factors only "
            "(info, convert and fuse take LoHa/LoKr files)"
        )
    return weights


def run_info(args) -> None:
    path = find_lora_file(args.file)
    print(describe(read_lora(path), path, file_format(path)))


def run_convert(args) -> None:
    output = output_path(args.output, args.to, args.overwrite)
    print(f"wrote {WRITERS[args.to](read_lora(args.file), output)}")


def run_resize(args) -> None:
    path = find_lora_file(args.file)
    fmt = args.to or default_format(path)
    output = output_path(args.output, fmt, args.overwrite)
    weights = _only_lora(path, read_lora(path), "resize")
    top = max(weights.rank(p, m) for p in weights.parts for m in weights.modules(p))
    if args.rank is not None and args.rank > top:
        raise UserError(
            f"{path}: --rank {args.rank} is above the LoRA's rank ({top}); resize can only lower it"
        )
    resized, report = resize_weights(weights, args.rank, args.dynamic_method, args.dynamic_param, args.device)
    for r in report:
        print(f"{r.part}.{r.module}: rank {r.old_rank} -> {r.new_rank}, keeps {r.kept:.2%} of its norm")
    worst = min(report, key=lambda r: r.kept)
    print(
        f"{len(report)} modules, mean kept {sum(r.kept for r in report) / len(report):.2%}, "
        f"least {worst.kept:.2%} ({worst.part}.{worst.module})"
    )
    print(f"wrote {WRITERS[fmt](resized, output)}")


def run_merge(args) -> None:
    weighted = [_weighted(item) for item in args.files]
    paths = [find_lora_file(name) for name, _ in weighted]
    fmt = args.to or default_format(paths[0])
    output = output_path(args.output, fmt, args.overwrite)
    loras = [(str(p), _only_lora(p, read_lora(p), "merge"), w) for p, (_, w) in zip(paths, weighted)]
    print(f"wrote {WRITERS[fmt](merge_weights(loras, args.rank, args.device), output)}")


def run_fuse(args) -> None:
    print(f"wrote {fuse(args.base_model, args.lora, args.scale, args.output, args.overwrite)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_args(args)
    {"info": run_info, "convert": run_convert, "resize": run_resize, "merge": run_merge, "fuse": run_fuse}[
        args.command
    ](args)
