"""kohya / AUTOMATIC1111 / ComfyUI LoRA names and tensors, to and from the peft names diffusers uses.

kohya's sd-scripts name a LoRA module after the module it adapts, dots turned into underscores:
`lora_unet_<module>` for the UNet, `lora_te_<module>` for the text encoder of SD 1.x/2.x and `lora_te1_` /
`lora_te2_` for SDXL's two. Each module has `.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B)
and `.alpha` (a 0-d float32 tensor: the LoRA adds alpha / rank * up @ down); LyCORIS adds `.dora_scale`
for DoRA. Convolutions (LoCon) keep their shapes: down (rank, in, kh, kw), up (out, rank, 1, 1), as in peft.

SD 1.x/2.x UNet names are diffusers' module paths (kohya's UNet re-implementation keeps them). SDXL's are
those of Stability's SGM UNet that kohya trains SDXL on (`input_blocks_4_1_...`, `middle_block_1_...`,
`output_blocks_2_2_conv`), numbered by layer, so the mapping depends on the UNet's layers_per_block;
diffusers' `_maybe_map_sgm_blocks_to_diffusers` (loaders/lora_conversion_utils.py) reads them back.
Text encoder names are transformers' CLIP paths with their `text_model.` root.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import torch

LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"
MAGNITUDE = ".lora_magnitude_vector"

_PART_OF_PREFIX = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")

# Words of module names that hold an underscore: kohya's names turn every dot into one, so these tell
# which underscores were there before.
_COMPOUNDS = set(
    """time_emb_proj final_layer_norm down_blocks up_blocks mid_block transformer_blocks proj_in proj_out
    to_q to_k to_v to_out conv_shortcut conv_in conv_out time_embedding linear_1 linear_2 add_embedding
    input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed
    label_emb text_model self_attn q_proj k_proj v_proj out_proj text_projection layer_norm1 layer_norm2
    token_embedding position_embedding""".split()
)

# SGM names of what lies outside the numbered blocks, and of a ResNet block's layers.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_SGM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_DIFFUSERS_TOP = {v: k for k, v in _SGM_TOP.items()}
_DIFFUSERS_RESNET = {v: k for k, v in _SGM_RESNET.items()}


class KohyaFormatError(ValueError):
    """A kohya-style file this module cannot map (the caller adds the file name)."""


@dataclass(frozen=True)
class SgmLayout:
    """What SGM block numbering depends on: layers per UNet level, and which up levels have attention."""

    layers_per_block: int = 2
    up_blocks_with_attention: frozenset[int] = frozenset({0, 1})

    @classmethod
    def from_unet_config(cls, config) -> SgmLayout:
        layers, types = config["layers_per_block"], config["up_block_types"]  # (a UNet's config is a dict)
        if not isinstance(layers, int):  # per-level counts: SGM numbering (and diffusers' reader) assume one
            if len(set(layers)) != 1:
                raise KohyaFormatError(
                    f"layers_per_block {tuple(layers)}: SGM names need one count per level"
                )
            layers = layers[0]
        return cls(layers, frozenset(i for i, t in enumerate(types) if "CrossAttn" in t))


SDXL_LAYOUT = SgmLayout()  # SDXL base (and the tiny SDXL): 2 layers per level, attention in up levels 0 and 1


@dataclass(frozen=True)
class KohyaNames:
    """How a family's LoRA modules are named in kohya's files: a prefix per model part, and the UNet's block
    layout (SGM's numbering for SDXL; None: diffusers' module paths, as SD 1.x/2.x keep them)."""

    prefixes: tuple[tuple[str, str], ...]  # (part, prefix) pairs
    sgm: SgmLayout | None = None
    # Where kohya's denoiser is another implementation than diffusers' (SD 3.5: Stability's MMDiT, with fused
    # qkv; sdlora/kohya_sd3.py): an object whose to_kohya(parts, alphas) and from_kohya(parts, alphas) turn
    # peft-named parts into that model's modules and back. None: the same modules under kohya's names.
    modules: object | None = None

    def prefix(self, part: str) -> str:
        return dict(self.prefixes)[part]

    @property
    def diffusers_reads(self) -> bool:
        """Whether diffusers' load_lora_weights reads these names itself (not SD 3.5's: no SD3 converter)."""
        return self.modules is None

    def from_kohya_parts(self, parts: dict, alphas: dict) -> tuple[dict, dict]:
        """Parts as from_kohya read them, in the diffusers modules of this family's denoiser."""
        return self.modules.from_kohya(parts, alphas) if self.modules is not None else (parts, alphas)

    def with_layout(self, layout: SgmLayout | None) -> KohyaNames:
        """The same names for a UNet of another block layout (SGM names only)."""
        return KohyaNames(self.prefixes, layout or self.sgm, self.modules) if self.sgm is not None else self


SD_NAMES = KohyaNames((("unet", "lora_unet_"), ("text_encoder", "lora_te_"), ("text_encoder_2", "lora_te2_")))
SDXL_NAMES = KohyaNames(
    (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")), SDXL_LAYOUT
)


def is_conv3(tensor: torch.Tensor) -> bool:
    """Whether a lora_A weight belongs to a spatial convolution (kernel over 1x1): LoCon's extra layers."""
    return tensor.ndim == 4 and tensor.shape[2] * tensor.shape[3] > 1


def _dotted(underscored: str) -> str:
    """A kohya module name (without prefix) back to its dotted module path."""
    words = underscored.split("_")
    out, i = [], 0
    while i < len(words):
        for n in (3, 2):
            if "_".join(words[i : i + n]) in _COMPOUNDS:
                out.append("_".join(words[i : i + n]))
                i += n
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def sgm_path(module: str, layout: SgmLayout) -> str:
    """diffusers UNet module path -> SGM path (SDXL's kohya names)."""
    if module in _SGM_TOP:
        return _SGM_TOP[module]
    span = layout.layers_per_block + 1  # SGM layers per level: the ResNets (+ attention) and the sampler
    if m := re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", module
    ):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if kind == "resnets":
            rest = _SGM_RESNET.get(rest, rest)
        if side == "down":
            if (
                kind == "downsamplers"
            ):  # input_blocks.0 is conv_in: levels start at 1; SGM calls the conv "op"
                rest = "op" if rest == "conv" else rest
                return f"input_blocks.{1 + block * span + layout.layers_per_block}.0.{rest}"
            return f"input_blocks.{1 + block * span + layer}.{int(kind == 'attentions')}.{rest}"
        if kind == "upsamplers":  # after the ResNet, and after the attention where the level has one
            inner = 2 if block in layout.up_blocks_with_attention else 1
            return f"output_blocks.{block * span + layout.layers_per_block}.{inner}.{rest}"
        return f"output_blocks.{block * span + layer}.{int(kind == 'attentions')}.{rest}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{_SGM_RESNET.get(m[3], m[3])}"
    raise KohyaFormatError(f"UNet module {module!r} has no name in kohya's SDXL (SGM) layout")


def _from_sgm(module: str, layout: SgmLayout) -> str:
    """SGM path -> diffusers UNet module path; the inverse of sgm_path."""
    if module in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[module]
    span = layout.layers_per_block + 1
    if m := re.fullmatch(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.+)", module):
        side, index, inner, rest = m[1], int(m[2]), int(m[3]), m[4]
        if side == "input":
            block, layer = divmod(index - 1, span)
            if rest == "op":
                return f"down_blocks.{block}.downsamplers.0.conv"
        else:
            block, layer = divmod(index, span)
            if rest == "conv":  # the only layer an upsampler has; a ResNet's or attention's differ
                return f"up_blocks.{block}.upsamplers.0.conv"
        if inner == 0:
            return f"{side.replace('input', 'down').replace('output', 'up')}_blocks.{block}.resnets.{layer}.{_DIFFUSERS_RESNET.get(rest, rest)}"
        return f"{side.replace('input', 'down').replace('output', 'up')}_blocks.{block}.attentions.{layer}.{rest}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", module):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{_DIFFUSERS_RESNET.get(m[2], m[2])}"
    raise KohyaFormatError(f"SGM UNet module {module!r} is not one kohya's SDXL layout has")


def kohya_module_name(part: str, module: str, names: KohyaNames = SD_NAMES) -> str:
    """`lora_unet_...` / `lora_te_...` name of a module (a diffusers/transformers path) of a model part."""
    if part == "unet" and names.sgm is not None:
        module = sgm_path(module, names.sgm)
    return names.prefix(part) + module.replace(".", "_")


def module_from_kohya_name(name: str, layout: SgmLayout = SDXL_LAYOUT) -> tuple[str, str]:
    """(part, module path) of a kohya module name; SGM UNet names are mapped to diffusers paths."""
    prefix = next((p for p in _PART_OF_PREFIX if name.startswith(p)), None)
    if prefix is None:
        raise KohyaFormatError(f"{name!r} starts with none of {', '.join(_PART_OF_PREFIX)}")
    part, module = _PART_OF_PREFIX[prefix], _dotted(name[len(prefix) :])
    if part == "unet" and module.split(".")[0] in (
        "input_blocks",
        "middle_block",
        "output_blocks",
        "out",
        "time_embed",
        "label_emb",
    ):
        module = _from_sgm(module, layout)
    return part, module


def to_kohya(
    parts: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, dict[str, float]],
    names: KohyaNames = SD_NAMES,
) -> dict[str, torch.Tensor]:
    """kohya tensors from peft-named ones: down/up as they are, alpha as a 0-d float32, DoRA as dora_scale.

    peft keeps DoRA's magnitude as (out,) for a Linear and (1, out, 1, 1) for a conv; LyCORIS (with
    wd_on_out, the per-output-row norm peft also uses) as (out, 1) and (out, 1, 1, 1).
    """
    if names.modules is not None:
        parts, alphas = names.modules.to_kohya(parts, alphas)
    out: dict[str, torch.Tensor] = {}
    for part, tensors in parts.items():
        for module, alpha in alphas[part].items():
            name = kohya_module_name(part, module, names)
            down = tensors[module + LORA_A]
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = tensors[module + LORA_B]
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            if module + MAGNITUDE in tensors:
                magnitude = tensors[module + MAGNITUDE].flatten()
                out[f"{name}.dora_scale"] = magnitude.reshape(-1, *[1] * (down.ndim - 1)).contiguous()
    return out


def from_kohya(
    state: dict[str, torch.Tensor], layout: SgmLayout = SDXL_LAYOUT
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """peft-named tensors and per-module alphas from kohya tensors; KohyaFormatError for what LoRA cannot hold."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, dot, suffix = key.partition(".")
        if f".{suffix}" not in _KOHYA_SUFFIXES:
            what = "LoCon with Tucker decomposition (lora_mid)" if "lora_mid" in suffix else f"tensor {key!r}"
            raise KohyaFormatError(f"{what} is not a plain LoRA/LoCon/DoRA tensor (LyCORIS LoHa/LoKr?)")
        grouped.setdefault(name, {})[f".{suffix}"] = tensor
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for name, tensors in grouped.items():
        if ".lora_down.weight" not in tensors or ".lora_up.weight" not in tensors:
            raise KohyaFormatError(f"module {name!r} lacks its lora_down or lora_up weight")
        part, module = module_from_kohya_name(name, layout)
        down, up = tensors[".lora_down.weight"], tensors[".lora_up.weight"]
        rank = down.shape[0]
        alpha = tensors[".alpha"].float().item() if ".alpha" in tensors else float(rank)  # kohya: none = rank
        target = parts.setdefault(part, {})
        target[module + LORA_A], target[module + LORA_B] = down, up
        if ".dora_scale" in tensors:
            target[module + MAGNITUDE] = _peft_magnitude(name, tensors[".dora_scale"], down, up)
        alphas.setdefault(part, {})[module] = alpha
    return parts, alphas


def _peft_magnitude(name: str, scale: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = up.shape[0]
    if scale.shape[0] != out or scale.numel() != out:
        # LyCORIS without wd_on_out normalises each input column; peft (and diffusers) only each output row.
        raise KohyaFormatError(
            f"module {name!r}: dora_scale of shape {tuple(scale.shape)} is normalised per input column, "
            "which peft/diffusers DoRA cannot represent (only per output row)"
        )
    return scale.reshape(1, out, 1, 1) if down.ndim == 4 else scale.reshape(out)


def network_metadata(
    parts: dict[str, dict[str, torch.Tensor]], alphas: dict[str, dict[str, float]]
) -> dict[str, str]:
    """The ss_network_* header keys kohya's trainers write, for what these tensors are."""
    linear, conv = Counter(), Counter()  # (rank, alpha) of Linear / 1x1 modules, and of spatial convs
    dora = False
    for part, tensors in parts.items():
        for module, alpha in alphas[part].items():
            down = tensors[module + LORA_A]
            (conv if is_conv3(down) else linear)[(down.shape[0], alpha)] += 1
            dora = dora or module + MAGNITUDE in tensors
    dim, alpha = (linear or conv).most_common(1)[0][0]
    args: dict[str, str] = {}
    if conv:
        conv_dim, conv_alpha = conv.most_common(1)[0][0]
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    if dora:  # DoRA comes from LyCORIS, whose LoCon is algo "locon" (linear-only: "lora")
        args = {"algo": "locon" if conv else "lora", "dora_wd": "True", **args}
    metadata = {
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
    }
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    return metadata
