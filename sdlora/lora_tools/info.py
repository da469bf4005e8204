"""`info`: what a LoRA file holds, by block: format, family, adapter type, ranks and alphas, metadata."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ..kohya import kohya_module_name
from ..lora_weights import LoraWeights

_FORMAT_NAMES = {
    "diffusers": "diffusers (ours)",
    "kohya": "kohya/A1111",
    "attn-procs": "old diffusers attn-procs",
}
# The block a module belongs to, in diffusers' and in kohya's SGM (SDXL) names (SD 3.5: its transformer blocks).
_BLOCK = re.compile(
    r"^((down|up|input|output|transformer)_blocks\.\d+|mid_block|middle_block\.\d+|text_model\.encoder\.layers\.\d+|[^.]+)"
)


def title(family) -> str:
    """A family's name for messages (families.Family or None)."""
    return family.title if family else "unknown (neither metadata nor shapes tell)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _numbers(values) -> str:
    """Ranks or alphas, largest first; a rank of None is a LoKr's full-matrix factors ("full")."""
    values = list(values)
    numbers = "/".join(f"{v:g}" for v in sorted({v for v in values if v is not None}, reverse=True))
    return "/".join(filter(None, [numbers, "full" if None in values else ""]))


def block_of(weights: LoraWeights, part: str, module: str, fmt: str) -> str:
    """The block a module is in, named as the file names it (kohya: underscores, SGM blocks for SDXL)."""
    names = weights.kohya_names
    if fmt == "kohya" and part == "unet" and names.sgm is not None:  # SGM block numbers
        name = kohya_module_name(part, module, names)
        module = name.removeprefix("lora_unet_")
        module = re.sub(r"^(input_blocks|middle_block|output_blocks)_(\d+)_.*", r"\1.\2", module)
    block = _BLOCK.match(module)[0].removeprefix("text_model.encoder.")
    return block.replace(".", "_") if fmt == "kohya" else block


def describe(weights: LoraWeights, path: Path, fmt: str) -> str:
    """What `info` prints: format, family, adapter type, module counts, rank and alpha by block, metadata."""
    lines = [
        f"file:       {path} ({_size(path.stat().st_size)})",
        f"format:     {_FORMAT_NAMES[fmt]}",
        f"base model: {title(weights.family)}",
        f"adapter:    {weights.adapter_type()}",
    ]
    counts = []
    for part in weights.parts:
        convs = sum(weights.is_conv(part, m) for m in weights.modules(part))
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
        chosen = [m for m in modules if weights.is_conv(part, m) == convs]
        if chosen:
            ranks = _numbers(weights.rank(part, m) for m in chosen)
            texts.append(f"rank {ranks} alpha {_numbers(weights.alphas[part][m] for m in chosen)}")
    return "; ".join(texts)
