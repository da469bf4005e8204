"""`resize` and `merge`: the SVD of each module's delta, truncated to a rank or by kohya's dynamic methods,
and weighted sums of LoRAs for one base model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..kohya import LORA_A, LORA_B, MAGNITUDE
from ..lora_weights import LoraWeights, float32
from .info import title

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


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
                f"{known[0][0]} is a LoRA for {title(known[0][1])} but {name} is one for {title(family)}; "
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
