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
import contextlib
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError, run_cli
from .families import FAMILIES, detect_family
from .kohya import LORA_A, LORA_B, MAGNITUDE, SDXL_LAYOUT, is_conv3, kohya_module_name
from .lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from .lora_files import check_family, check_fits, find_lora_file, lora_format, read_lora
from .lora_weights import (
    LoraWeights,
    float32,
    write_diffusers,
    write_kohya,
)
from .models import resolve_model

FORMATS = ("diffusers", "kohya")
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
_WRITERS = {"diffusers": write_diffusers, "kohya": write_kohya}
_DEFAULT_NAMES = {"diffusers": LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME}
_FORMAT_NAMES = {
    "diffusers": "diffusers (ours)",
    "kohya": "kohya/A1111",
    "attn-procs": "old diffusers attn-procs",
}
# The block a module belongs to, in diffusers' and in kohya's SGM (SDXL) names.
_BLOCK = re.compile(
    r"^((down|up|input|output)_blocks\.\d+|mid_block|middle_block\.\d+|text_model\.encoder\.layers\.\d+|[^.]+)"
)


# --- reading and writing -----------------------------------------------------------------------------


def file_format(path: Path) -> str:
    """'diffusers' or 'kohya' (or 'attn-procs') of a LoRA file, from its key names."""
    if path.suffix.lower() != ".safetensors":
        return "attn-procs"  # the original toolkit's .bin
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return lora_format(list(f.keys())) or "diffusers"


def default_format(path: Path) -> str:
    """The format outputs of a file are written in unless --to says: its own (the old .bin: ours)."""
    fmt = file_format(path)
    return "diffusers" if fmt == "attn-procs" else fmt


def output_path(output: str | Path, fmt: str, overwrite: bool) -> Path:
    """The file to write: `output` if it names a .safetensors file, else the format's usual file name in
    that folder (so that `pipe.load_lora_weights(folder)` finds it); an existing file only with overwrite."""
    path = Path(output)
    if path.suffix.lower() != ".safetensors":
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: not a folder; give a folder or a path ending in .safetensors")
        path = path / _DEFAULT_NAMES[fmt]
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it, or another --output")
    return path


# --- info --------------------------------------------------------------------------------------------


def _title(family: str | None) -> str:
    return FAMILIES[family].title if family else "unknown (neither metadata nor shapes tell)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _numbers(values) -> str:
    return "/".join(f"{v:g}" for v in sorted(set(values), reverse=True))


def block_of(weights: LoraWeights, part: str, module: str, fmt: str) -> str:
    """The block a module is in, named as the file names it (kohya: underscores, SGM blocks for SDXL)."""
    if fmt == "kohya" and part == "unet" and weights.sdxl:
        name = kohya_module_name(part, module, True, weights.sgm_layout or SDXL_LAYOUT)
        module = name.removeprefix("lora_unet_")
        module = re.sub(r"^(input_blocks|middle_block|output_blocks)_(\d+)_.*", r"\1.\2", module)
    block = _BLOCK.match(module)[0].removeprefix("text_model.encoder.")
    return block.replace(".", "_") if fmt == "kohya" else block


def describe(weights: LoraWeights, path: Path, fmt: str) -> str:
    """What `info` prints: format, family, adapter type, module counts, rank and alpha by block, metadata."""
    lines = [
        f"file:       {path} ({_size(path.stat().st_size)})",
        f"format:     {_FORMAT_NAMES[fmt]}",
        f"base model: {_title(weights.family)}",
        f"adapter:    {weights.adapter_type()}",
    ]
    counts = []
    for part in weights.parts:
        convs = sum(is_conv3(weights.down(part, m)) for m in weights.modules(part))
        counts.append(f"{part} {len(weights.modules(part))}" + (f" ({convs} spatial convs)" if convs else ""))
    lines.append(f"modules:    {', '.join(counts)}")
    lines.append("rank / alpha by block (convs after ';'):")
    for part in weights.parts:
        blocks: dict[str, list[str]] = defaultdict(list)
        for module in weights.modules(part):
            blocks[block_of(weights, part, module, fmt)].append(module)
        for block, modules in blocks.items():
            lines.append(
                f"  {part:<15} {block:<24} {len(modules):>4} modules  {_rank_alpha(weights, part, modules)}"
            )
    lines.append("metadata:" if weights.metadata else "metadata:   none")
    for key, value in sorted(weights.metadata.items()):
        value = value if len(value) <= 100 else value[:97] + "..."  # ss_tag_frequency etc. are long JSON
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _rank_alpha(weights: LoraWeights, part: str, modules: list[str]) -> str:
    texts = []
    for convs in (False, True):
        chosen = [m for m in modules if is_conv3(weights.down(part, m)) == convs]
        if chosen:
            ranks = _numbers(weights.rank(part, m) for m in chosen)
            texts.append(f"rank {ranks} alpha {_numbers(weights.alphas[part][m] for m in chosen)}")
    return "; ".join(texts)


# --- resize and merge: SVD of each module's delta ------------------------------------------------------


@dataclass
class ModuleResize:
    """How one module was resized: its rank before and after and the share of its delta's norm kept."""

    part: str
    module: str
    old_rank: int
    new_rank: int
    kept: float  # Frobenius norm of the truncated delta / of the full delta


def _svd_of_product(up: torch.Tensor, down: torch.Tensor):
    """U, S, Vh of up @ down (out x r times r x in) without forming it: QR of both factors, SVD of r x r.

    Exact, and cheap next to an SVD of the full (out x in) matrix for SDXL's 1280-wide layers.
    """
    q_up, r_up = torch.linalg.qr(up)  # (out, r), (r, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def choose_rank(s: torch.Tensor, cap: int, method: str | None, param: float | None) -> int:
    """New rank from the singular values: the cap, or kohya's dynamic methods (within 1..cap)."""
    if s[0] <= 0:  # a zero delta: one rank is enough (as kohya does)
        return 1
    if method is None:
        rank = cap
    elif method == "sv_ratio":  # keep singular values above the largest / param
        rank = int((s > s[0] / param).sum())
    else:  # smallest rank whose share of the Frobenius norm (sv_fro) or of the sum (sv_cumulative) >= param
        share = (s**2).cumsum(0).sqrt() / (s**2).sum().sqrt() if method == "sv_fro" else s.cumsum(0) / s.sum()
        rank = int((share < param - 1e-12).sum()) + 1
    return max(1, min(rank, cap, len(s)))


def _truncate(up, down, rank, method, param, device):
    """New (up, down) of the module's delta truncated by SVD, and the share of its norm kept."""
    shape_up, shape_down = up.shape, down.shape
    u, s, vh = _svd_of_product(
        up.flatten(1).to(device, torch.float64), down.flatten(1).to(device, torch.float64)
    )
    k = choose_rank(s, rank, method, param)
    kept = float((s[:k] ** 2).sum().sqrt() / (s**2).sum().sqrt()) if s[0] > 0 else 1.0
    new_up = (u[:, :k] * s[:k]).reshape(shape_up[0], k, *shape_up[2:])  # (out, k[, 1, 1])
    new_down = vh[:k].reshape(k, *shape_down[1:])  # (k, in[, kh, kw])
    return new_up.float().cpu().contiguous(), new_down.float().cpu().contiguous(), kept


def resize_weights(
    weights: LoraWeights,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    device: str = "cpu",
) -> tuple[LoraWeights, list[ModuleResize]]:
    """Each module's delta (alpha / rank * up @ down) truncated by SVD to `rank` or by a dynamic method.

    `rank` caps the new rank (default: each module's own). The new alpha keeps the module's alpha / rank
    ratio, so the effective weight is exactly the truncated SVD. DoRA keeps its magnitude vector: the
    direction is renormalised from the truncated delta, which is exact at full rank.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    report = []
    for part in weights.parts:
        parts[part], alphas[part] = {}, {}
        for module in weights.modules(part):
            old = weights.rank(part, module)
            cap = min(rank or old, old)
            up, down, kept = _truncate(
                weights.up(part, module), weights.down(part, module), cap, method, param, device
            )
            new = down.shape[0]
            parts[part][module + LORA_A], parts[part][module + LORA_B] = down, up
            if (magnitude := weights.magnitude(part, module)) is not None:
                parts[part][module + MAGNITUDE] = magnitude
            alphas[part][module] = float32(weights.alphas[part][module] / old * new)
            report.append(ModuleResize(part, module, old, new, kept))
    resized = LoraWeights(parts, alphas, weights.family, dict(weights.metadata), weights.sgm_layout)
    return resized, report


def merge_weights(
    loras: list[tuple[str, LoraWeights, float]], rank: int | None = None, device: str = "cpu"
) -> LoraWeights:
    """The weighted sum of LoRAs (name, weights, weight) for one base model.

    Without `rank`, ranks are concatenated: the downs stacked, the ups scaled by weight * alpha / rank,
    alpha = the new rank (scale 1), so the sum is exact. With `rank`, each summed delta is truncated by SVD.
    """
    _check_mergeable(loras)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for part in dict.fromkeys(p for _, w, _ in loras for p in w.parts):
        parts[part], alphas[part] = {}, {}
        for module in dict.fromkeys(m for _, w, _ in loras for m in w.modules(part)):
            having = [(w, s) for _, w, s in loras if module in w.alphas.get(part, {})]
            downs = [w.down(part, module) for w, _ in having]
            ups = [
                w.up(part, module) * (s * w.alphas[part][module] / w.rank(part, module)) for w, s in having
            ]
            down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)  # (sum r, in...), (out, sum r...)
            if rank is not None:
                up, down, _ = _truncate(up, down, rank, None, None, device)
            parts[part][module + LORA_A], parts[part][module + LORA_B] = down.contiguous(), up.contiguous()
            alphas[part][module] = float(down.shape[0])
    first = loras[0][1]
    common = {k: v for k, v in first.metadata.items() if all(w.metadata.get(k) == v for _, w, _ in loras)}
    family = next((w.family for _, w, _ in loras if w.family), None)
    layout = next((w.sgm_layout for _, w, _ in loras if w.sgm_layout), None)
    return LoraWeights(parts, alphas, family, common, layout)


def _check_mergeable(loras: list[tuple[str, LoraWeights, float]]) -> None:
    for name, weights, _ in loras:
        if weights.is_dora():
            raise UserError(
                f"{name}: a DoRA; DoRAs cannot be merged by summing (each renormalises by its own magnitude)"
            )
    known = [(name, w.family) for name, w, _ in loras if w.family]
    for name, family in known[1:]:
        if family != known[0][1]:
            raise UserError(
                f"{known[0][0]} is a LoRA for {_title(known[0][1])} but {name} is one for {_title(family)}; "
                "merge LoRAs made for the same base model"
            )
    first_name, first, _ = loras[0]
    for name, weights, _ in loras[1:]:
        for part in weights.parts.keys() & first.parts.keys():
            for module in weights.alphas[part].keys() & first.alphas[part].keys():
                a, b = first.delta(part, module).shape, weights.delta(part, module).shape
                if a != b:
                    raise UserError(
                        f"{first_name} and {name} do not fit the same base model: {part} module {module} is "
                        f"{tuple(a)} in one and {tuple(b)} in the other"
                    )


# --- fuse --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_loading():
    # diffusers and transformers report every adapter load at length (missing base keys, "No LoRA keys
    # found for CLIPTextModel"); the fit has been checked here before loading.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def load_base_pipeline(model: str):
    """The base model's pipeline (any family) on the CPU in fp32."""
    from diffusers import DiffusionPipeline

    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{model}: cannot load the model ({str(e).splitlines()[0]}); check the id or path"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuse(
    base_model: str | None, lora: str | Path, scale: float, output: str | Path, overwrite: bool = False
) -> Path:
    """Save the base model with the LoRA baked into its weights (diffusers' fuse_lora, then unload)."""
    from .fileio import atomic_directory

    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it, or another --output")
    weights = read_lora(lora)
    model = resolve_model(base_model)
    check_family(weights, detect_family(model).name, str(lora), model)  # before the model loads
    pipe = load_base_pipeline(model)
    check_fits(weights, pipe, str(lora))
    with tempfile.TemporaryDirectory() as tmp, _quiet_loading():
        write_diffusers(weights, Path(tmp) / LORA_WEIGHT_NAME)
        pipe.load_lora_weights(tmp, adapter_name="fused")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
        pipe.unload_lora_weights()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return output


# --- the command ---------------------------------------------------------------------------------------


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


def run_info(args) -> None:
    path = find_lora_file(args.file)
    print(describe(read_lora(path), path, file_format(path)))


def run_convert(args) -> None:
    output = output_path(args.output, args.to, args.overwrite)
    print(f"wrote {_WRITERS[args.to](read_lora(args.file), output)}")


def run_resize(args) -> None:
    path = find_lora_file(args.file)
    fmt = args.to or default_format(path)
    output = output_path(args.output, fmt, args.overwrite)
    weights = read_lora(path)
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
    print(f"wrote {_WRITERS[fmt](resized, output)}")


def run_merge(args) -> None:
    weighted = [_weighted(item) for item in args.files]
    paths = [find_lora_file(name) for name, _ in weighted]
    fmt = args.to or default_format(paths[0])
    output = output_path(args.output, fmt, args.overwrite)
    loras = [(str(path), read_lora(path), weight) for path, (_, weight) in zip(paths, weighted)]
    print(f"wrote {_WRITERS[fmt](merge_weights(loras, args.rank, args.device), output)}")


def run_fuse(args) -> None:
    print(f"wrote {fuse(args.base_model, args.lora, args.scale, args.output, args.overwrite)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _check_args(args)
    {"info": run_info, "convert": run_convert, "resize": run_resize, "merge": run_merge, "fuse": run_fuse}[
        args.command
    ](args)


if __name__ == "__main__":
    run_cli(main)
