"""SD 3.5's kohya/ComfyUI LoRA names: Stability's MMDiT module paths, with fused qkv projections.

kohya's sd-scripts train SD3 on Stability's own MMDiT (networks/lora_sd3.py) and name its modules
`lora_unet_joint_blocks_<i>_<x_block|context_block>_<layer>` (plus `lora_unet_x_embedder_proj`,
`..._final_layer_linear` and the other embedders); ComfyUI's key map (comfy/lora.py, model_lora_keys_unet)
places those names on the same model. That model computes q, k and v with one `attn.qkv` Linear where
diffusers' SD3Transformer2DModel has `to_q`, `to_k` and `to_v` (`add_q_proj`... for the context stream), so:

- writing, the three LoRAs of a qkv become one: down = [A_q; A_k; A_v] (3r, in), up = the block diagonal of
  B_q, B_k, B_v (3 out, 3r), alpha = 3r times their scale alpha / r: the same delta, exactly;
- reading, a block-diagonal up (ours, and kohya's split_qkv files) splits back exactly, each third with the
  columns it uses; any other fused LoRA gives each of q, k, v the whole down and its third of the up (the
  same delta, at the fused rank).

AdaLayerNormContinuous (the final norm and the last block's context norm) orders its output (scale, shift)
where Stability's adaLN_modulation orders it (shift, scale), so those LoRAs' up rows swap halves (ComfyUI's
swap_scale_shift, comfy/utils.py). Text encoders keep kohya's `lora_te1_` (CLIP-L) and `lora_te2_` (CLIP-G).
"""

from __future__ import annotations

import re

import torch

from .kohya import LORA_A, LORA_B, MAGNITUDE, KohyaFormatError, KohyaNames

QKV = ("q", "k", "v")
# diffusers' module path inside transformer_blocks.<i> -> (Stability's path inside joint_blocks.<i>, qkv slot)
_BLOCK = {
    **{f"attn.to_{s}": ("x_block.attn.qkv", i) for i, s in enumerate(QKV)},
    **{f"attn.add_{s}_proj": ("context_block.attn.qkv", i) for i, s in enumerate(QKV)},
    **{f"attn2.to_{s}": ("x_block.attn2.qkv", i) for i, s in enumerate(QKV)},  # MMDiT-X (SD 3.5 Medium)
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
# The same tables keyed by kohya's underscored names (what a kohya key holds after its prefix).
_BLOCK_BACK = {(sai.replace(".", "_"), slot): ours for ours, (sai, slot) in _BLOCK.items()}
_FUSED = {sai.replace(".", "_") for sai, slot in _BLOCK.values() if slot is not None}
_TOP_BACK = {sai.replace(".", "_"): ours for ours, sai in _TOP.items()}


def stability_path(module: str) -> tuple[str, int | None]:
    """(Stability's MMDiT path, qkv slot or None) of a diffusers SD3Transformer2DModel module."""
    if module in _TOP:
        return _TOP[module], None
    if (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in _BLOCK:
        sai, slot = _BLOCK[m[2]]
        return f"joint_blocks.{m[1]}.{sai}", slot
    raise KohyaFormatError(f"transformer module {module!r} has no name in kohya's SD3 (MMDiT) layout")


def _swaps(module: str, down: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the module is an AdaLayerNormContinuous (scale, shift): the final norm, or a context norm
    with two chunks (the last block's; the others' AdaLayerNormZero has six, in Stability's order)."""
    return module == "norm_out.linear" or (
        module.endswith("norm1_context.linear") and up.shape[0] == 2 * down.shape[1]
    )


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    half = tensor.shape[0] // 2
    return torch.cat([tensor[half:], tensor[:half]]).contiguous()


class MMDiTNames:
    """The conversion between diffusers' SD3 transformer LoRA and kohya's (Stability's names, fused qkv)."""

    def to_kohya(self, parts: dict, alphas: dict) -> tuple[dict, dict]:
        """The transformer part in Stability's module names with fused qkv; text encoders as they are."""
        if "transformer" not in parts:
            return parts, alphas
        tensors, module_alphas = parts["transformer"], alphas["transformer"]
        out: dict[str, torch.Tensor] = {}
        out_alphas: dict[str, float] = {}
        fused: dict[str, dict[int, str]] = {}
        for module, alpha in module_alphas.items():
            sai, slot = stability_path(module)
            if slot is not None:
                fused.setdefault(sai, {})[slot] = module
                continue
            down, up = tensors[module + LORA_A], tensors[module + LORA_B]
            swap = _swaps(module, down, up)
            out[sai + LORA_A], out[sai + LORA_B] = down, _swap_halves(up) if swap else up
            if module + MAGNITUDE in tensors:
                magnitude = tensors[module + MAGNITUDE]
                out[sai + MAGNITUDE] = _swap_halves(magnitude) if swap else magnitude
            out_alphas[sai] = alpha
        for sai, slots in fused.items():
            self._fuse(sai, slots, tensors, module_alphas, out, out_alphas)
        return {**parts, "transformer": out}, {**alphas, "transformer": out_alphas}

    @staticmethod
    def _fuse(sai: str, slots: dict[int, str], tensors: dict, alphas: dict, out: dict, out_alphas: dict):
        """One qkv LoRA from the q, k, v ones present (a missing one's rows stay zero)."""
        first = tensors[slots[min(slots)] + LORA_A]
        rows = tensors[slots[min(slots)] + LORA_B].shape[0]  # each of q, k, v has as many outputs
        scale0 = alphas[slots[min(slots)]] / first.shape[0]
        downs, offset = [], 0
        rank = sum(tensors[m + LORA_A].shape[0] for m in slots.values())
        up = torch.zeros(3 * rows, rank, dtype=first.dtype)  # (3 out, sum of ranks)
        for slot in sorted(slots):
            module = slots[slot]
            a, b = tensors[module + LORA_A], tensors[module + LORA_B]
            scale = alphas[module] / a.shape[0]
            downs.append(a)
            # scales folded into B where q, k, v differ (the fused module has one alpha)
            up[slot * rows : (slot + 1) * rows, offset : offset + a.shape[0]] = b * (scale / scale0)
            offset += a.shape[0]
        out[sai + LORA_A], out[sai + LORA_B] = torch.cat(downs), up
        out_alphas[sai] = _f32(rank * scale0)
        magnitudes = [tensors.get(slots[s] + MAGNITUDE) if s in slots else None for s in range(3)]
        if any(m is not None for m in magnitudes):
            if any(m is None for m in magnitudes):  # DoRA normalises whole rows, which need the base weight
                raise KohyaFormatError(f"{sai}: DoRA on only some of q, k, v cannot be fused into one qkv")
            out[sai + MAGNITUDE] = torch.cat(magnitudes)

    def from_kohya(self, parts: dict, alphas: dict) -> tuple[dict, dict]:
        """The `unet` part kohya's reader gave (Stability's names) as diffusers' transformer, qkv split."""
        if "unet" not in parts:
            return parts, alphas
        tensors, module_alphas = parts["unet"], alphas["unet"]
        out: dict[str, torch.Tensor] = {}
        out_alphas: dict[str, float] = {}
        for module, alpha in module_alphas.items():
            name = module.replace(".", "_")
            down, up = tensors[module + LORA_A], tensors[module + LORA_B]
            magnitude = tensors.get(module + MAGNITUDE)
            if m := re.fullmatch(r"joint_blocks_(\d+)_(.+)", name):
                block, rest = f"transformer_blocks.{m[1]}.", m[2]
                if rest in _FUSED:
                    targets = [block + _BLOCK_BACK[(rest, slot)] for slot in range(3)]
                    for target, piece in zip(targets, _split_qkv(down, up, alpha, magnitude)):
                        if piece is not None:
                            _put(out, out_alphas, target, *piece)
                    continue
                if (rest, None) not in _BLOCK_BACK:
                    raise KohyaFormatError(f"SD3 module {name!r} is not one kohya's SD3 LoRA has")
                target = block + _BLOCK_BACK[(rest, None)]
            elif name in _TOP_BACK:
                target = _TOP_BACK[name]
            else:
                raise KohyaFormatError(f"SD3 module {name!r} is not one kohya's SD3 LoRA has")
            if _swaps(target, down, up):
                up = _swap_halves(up)
                magnitude = _swap_halves(magnitude) if magnitude is not None else None
            _put(out, out_alphas, target, down, up, alpha, magnitude)
        rest = {k: v for k, v in parts.items() if k != "unet"}
        rest_alphas = {k: v for k, v in alphas.items() if k != "unet"}
        return {"transformer": out, **rest}, {"transformer": out_alphas, **rest_alphas}


def _put(out: dict, alphas: dict, module: str, down, up, alpha: float, magnitude) -> None:
    out[module + LORA_A], out[module + LORA_B] = down.contiguous(), up.contiguous()
    if magnitude is not None:
        out[module + MAGNITUDE] = magnitude.contiguous()
    alphas[module] = alpha


def _split_qkv(down: torch.Tensor, up: torch.Tensor, alpha: float, magnitude):
    """(down, up, alpha, magnitude) of q, k and v from a fused qkv LoRA, or None for one it leaves alone.

    A block-diagonal up (ours; kohya's split_qkv) splits exactly: in equal thirds where each third's up uses
    only its own columns (a zero third, as the last block's context q that gets no gradient, stays), else
    each third with the columns it uses (ranks that differ, as after `resize`). Any other keeps its delta
    exactly: each of q, k, v gets the whole down and its third of the up."""
    rank, rows = down.shape[0], up.shape[0] // 3
    ups = [up[i * rows : (i + 1) * rows] for i in range(3)]
    mags = [magnitude[i * rows : (i + 1) * rows] if magnitude is not None else None for i in range(3)]
    used = [u.abs().sum(dim=0) > 0 for u in ups]  # (rank,) the columns each third uses
    disjoint = not any((used[i] & used[j]).any() for i in range(3) for j in range(i + 1, 3))

    def piece(i: int, columns: torch.Tensor):
        share = int(columns.sum())
        return (
            down[columns],
            ups[i][:, columns],
            _f32(alpha * share / rank),
            mags[i],
        )  # (scale alpha / rank kept)

    if rank % 3 == 0:  # equal thirds where each third's up uses only its own columns (a zero one too)
        thirds = [torch.arange(rank) // (rank // 3) == i for i in range(3)]
        if all(not (used[i] & ~thirds[i]).any() for i in range(3)):
            return [piece(i, thirds[i]) for i in range(3)]
    if disjoint and any(u.any() for u in used) and all(u.any() or m is None for u, m in zip(used, mags)):
        return [piece(i, used[i]) if used[i].any() else None for i in range(3)]
    return [(down, ups[i], alpha, mags[i]) for i in range(3)]


def _f32(value: float) -> float:
    """The value as a float32 holds it, as kohya's alphas are stored."""
    return float(torch.tensor(value, dtype=torch.float32).item())


SD3_NAMES = KohyaNames(
    (("transformer", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")),
    modules=MMDiTNames(),
)
