"""LyCORIS's LoHa and LoKr adapters: peft's configs to train them, their two files, the weight delta as the
clients compute it, and loading them into a pipeline.

LoHa adds (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank to a weight (Hadamard product of two low-rank
products; FedPara, arXiv 2108.06098); LoKr adds kron(w1, w2) * alpha / rank, each factor a full matrix or a
low-rank product (w1 = w1_a @ w1_b), where rank is the inner size of a decomposed factor and the scale is 1
when both are full: LyCORIS trains such modules with scale 1 (lycoris/modules/lokr.py sets alpha to the
rank), and ComfyUI, A1111 and kohya apply them so; `peft_config` gives them alpha = r for peft's alpha / r
to agree. With Tucker convs (`use_tucker`, peft's use_effective_conv2d) a 3x3 conv's factors are
einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a) instead of w_a @ w_b.

The tensors keep peft's names, which are LyCORIS's: `<module>.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`,
`.hada_w2_b` (+ `.hada_t1`, `.hada_t2`); `<module>.lokr_w1` or `.lokr_w1_a` / `.lokr_w1_b`, `.lokr_w2` or
`.lokr_w2_a` / `.lokr_w2_b` (+ `.lokr_t2`). A non-Tucker conv's factors multiply to (out, in * kh * kw).
There is no diffusers format for them (diffusers' load_lora_weights reads LoRA only), so the two files are:

- pytorch_lora_weights_kohya.safetensors, LyCORIS's format: `lora_unet_<module>.hada_w1_a` ... and
  `<name>.alpha` (0-d float32), kohya's module names (sdlora.kohya: `lora_te_` / `lora_te1_` / `lora_te2_`,
  SGM blocks for SDXL), `ss_network_module` "lycoris.kohya" and `ss_network_args` {"algo": "loha", ...}.
  kohya's sd-scripts (with LyCORIS), A1111 (LyCORIS built in since 1.5) and ComfyUI read it natively.
- pytorch_lora_weights.safetensors: the same tensors under each part's peft module paths
  (`unet.<module>.hada_w1_a`, `unet.<module>.alpha`, `text_encoder.text_model...`): what sdlora's loader,
  lora_tools and resuming read; `peft.set_peft_model_state_dict` takes a part's tensors as they are.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from .kohya import KohyaFormatError, KohyaNames, kohya_module_name, module_from_kohya_name

TENSORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
TITLES = {"loha": "LoHa", "lokr": "LoKr"}
NETWORK_OF = {name: network for network, names in TENSORS.items() for name in names}
_SUFFIX = re.compile(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2)$")
# The denoisers' 3x3 convs (ResNets, samplers, conv_in/out): a non-Tucker LoHa/LoKr conv's factors are
# flattened to (out, in * kh * kw), so only the name tells it from a Linear layer.
_SPATIAL_CONVS = ("conv1", "conv2", "conv", "conv_in", "conv_out")
_CORES = {"hada_w1": "hada_t1", "hada_w2": "hada_t2", "lokr_w2": "lokr_t2"}  # Tucker cores of the factors


def network_of(keys) -> str | None:
    """'loha' or 'lokr' when any of these tensor names is a LoHa's or LoKr's, else None."""
    for key in keys:
        if m := _SUFFIX.search(key):
            return NETWORK_OF[m[1]]
    return None


def factors(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """{tensor name (hada_w1_a, ...): tensor} of one module."""
    return {m[1]: t for k, t in tensors.items() if k.startswith(module + ".") and (m := _SUFFIX.search(k))}


def modules_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules, in the order their first tensor comes."""
    return list(dict.fromkeys(_SUFFIX.sub("", k) for k in tensors if _SUFFIX.search(k)))


def rank(tensors: dict[str, torch.Tensor], module: str) -> int | None:
    """The rank alpha is divided by, as the clients read it: a decomposed factor's inner size (w2's over
    w1's, as ComfyUI's lokr.py); None for a LoKr of two full matrices (scale 1)."""
    f = factors(tensors, module)
    for name in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in f:
            return f[name].shape[0]
    return None


def scale(tensors: dict[str, torch.Tensor], module: str, alpha: float) -> float:
    r = rank(tensors, module)
    return alpha / r if r else 1.0


def _product(f: dict[str, torch.Tensor], w: str) -> torch.Tensor:
    """One factor: w itself, t contracted with w_a and w_b (Tucker), or w_a @ w_b."""
    if w in f:
        return f[w]
    t = f.get(_CORES.get(w, ""))
    if t is not None:  # (r, r, kh, kw) x (r, in) x (r, out) -> (out, in, kh, kw)
        # (contiguous: torch.kron fails on the einsum's strides; LyCORIS's make_kron does the same)
        return torch.einsum("i j k l, j r, i p -> p r k l", t, f[w + "_b"], f[w + "_a"]).contiguous()
    return f[w + "_a"] @ f[w + "_b"]


def delta(tensors: dict[str, torch.Tensor], module: str, alpha: float) -> torch.Tensor:
    """What a module adds to its weight, as ComfyUI computes it (comfy/weight_adapter/loha.py, lokr.py):
    (out, in[, kh, kw]), or (out, in * kh * kw) for a non-Tucker conv (reshape it to the weight's shape)."""
    f = {k: v.float() for k, v in factors(tensors, module).items()}
    if "hada_w1_a" in f:
        diff = _product(f, "hada_w1") * _product(f, "hada_w2")
    else:
        w1, w2 = _product(f, "lokr_w1"), _product(f, "lokr_w2")
        diff = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)  # (a*c, b*d[, kh, kw])
    return diff * scale(tensors, module, alpha)


def title(parts: dict[str, dict[str, torch.Tensor]]) -> str:
    """LoHa or LoKr with what its factors are: Tucker convs, LoKr's small-factor sizes (its factor)."""
    tensors = {k: v for t in parts.values() for k, v in t.items()}
    network = network_of(tensors)
    notes = ["Tucker convs"] if any(_SUFFIX.search(k)[1] in _CORES.values() for k in tensors) else []
    if network == "lokr":
        small = {f"{w.shape[0]}x{w.shape[1]}" for k, w in tensors.items() if k.endswith(".lokr_w1")}
        small |= {
            f"{a.shape[0]}x{tensors[k[:-1] + 'b'].shape[1]}"
            for k, a in tensors.items()
            if k.endswith(".lokr_w1_a")
        }
        sizes = sorted(small, key=lambda s: [int(n) for n in s.split("x")])
        notes.insert(0, f"small factor {'/'.join(sizes[:4])}{'/...' if len(sizes) > 4 else ''}")
    return f"{TITLES[network]} ({', '.join(notes)})" if notes else TITLES[network]


def is_spatial_conv(tensors: dict[str, torch.Tensor], module: str) -> bool:
    """Whether the module is a spatial conv (kohya's conv_dim): 4-d factors, or a 3x3 conv's name."""
    return module.rsplit(".", 1)[-1] in _SPATIAL_CONVS or any(
        t.ndim == 4 and t.shape[2] * t.shape[3] > 1 for t in factors(tensors, module).values()
    )


# --- training ----------------------------------------------------------------------------------------


def peft_config(spec, targets: list[str], rank_pattern: dict, alpha_pattern: dict, model: torch.nn.Module):
    """peft's LoHaConfig / LoKrConfig for spec.network (spec: lora.AdapterSpec) on `targets` of `model`.

    LoKr modules whose two factors come out full (peft decides that as LyCORIS does: from the rank, the
    factor and decompose_both) get alpha = r, so that peft's alpha / r is 1, as LyCORIS trains them."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(
        r=spec.rank,
        alpha=spec.alpha,
        target_modules=targets,
        rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout,
        use_effective_conv2d=spec.use_tucker,
    )
    if spec.network == "loha":
        return LoHaConfig(**common, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    config = LoKrConfig(
        **common,
        decompose_both=spec.decompose_both,
        decompose_factor=spec.lokr_factor,
        rank_pattern=rank_pattern,
        init_weights="lycoris",  # (w2 starts at zero, w1 random: LyCORIS's initialisation)
    )
    # (module paths as keys: peft matches a key as a path suffix, and no path ends in another whole path)
    config.alpha_pattern = {**alpha_pattern, **{n: float(r) for n, r in _lokr_full(model, config).items()}}
    return config


def _lokr_full(model: torch.nn.Module, config) -> dict[str, int]:
    """{module path: its r} of the layers `config` adapts whose LoKr factors are both full matrices
    (peft.tuners.lokr.layer.LoKrLayer.update_layer's rule)."""
    from peft.tuners.lokr.layer import factorization
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    out = {}
    for name, layer in model.named_modules():
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim not in (2, 4) or not check_target_module_exists(config, name):
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        # w1 (out_small, in_small), w2 (out_big, in_big[, kh, kw]): out = out_small * out_big, in likewise
        (out_small, out_big), (in_small, in_big) = (
            factorization(n, config.decompose_factor) for n in weight.shape[:2]
        )
        w1_full = not (config.decompose_both and r < max(out_small, in_small) / 2)
        if w1_full and r >= max(out_big, in_big) / 2:
            out[name] = r
    return out


def layer_alphas(model: torch.nn.Module, adapter_name: str) -> dict[str, float]:
    """{module path: alpha} of a model's peft LoHa/LoKr layers."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {
        name: float(layer.alpha[adapter_name])
        for name, layer in model.named_modules()
        if isinstance(layer, LycorisLayer) and adapter_name in layer.alpha
    }


# --- files ---------------------------------------------------------------------------------------------


def to_kohya(parts: dict, alphas: dict, names: KohyaNames) -> dict[str, torch.Tensor]:
    """LyCORIS's file tensors: `<kohya module name>.<tensor name>` and `.alpha` (0-d float32)."""
    if names.modules is not None:  # (SD 3.5: kohya's modules fuse q, k and v, which no product can split)
        raise KohyaFormatError("LoHa/LoKr have no kohya names for this model's modules")
    return _renamed(parts, alphas, lambda part, module: kohya_module_name(part, module, names))


def to_parts(parts: dict, alphas: dict) -> dict[str, torch.Tensor]:
    """Our file's tensors: `<part>.<module path>.<tensor name>` and `<part>.<module path>.alpha`."""
    return _renamed(parts, alphas, lambda part, module: f"{part}.{module}")


def _renamed(parts: dict, alphas: dict, name_of) -> dict[str, torch.Tensor]:
    out = {}
    for part, tensors in parts.items():
        for module, alpha in alphas[part].items():
            name = name_of(part, module)
            out.update({f"{name}.{k}": v.contiguous() for k, v in factors(tensors, module).items()})
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def from_file(state: dict[str, torch.Tensor], kohya: bool, layout) -> tuple[dict, dict]:
    """(parts, alphas) of a LoHa/LoKr file, LyCORIS's (`kohya`) or ours; KohyaFormatError for what is not
    a plain LoHa or LoKr (DoRA's dora_scale, LyCORIS's scalar, another algorithm's tensors)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    places: dict[str, tuple[str, str]] = {}
    network = network_of(state)
    for key, tensor in state.items():
        name, _, suffix = key.rpartition(".")
        if suffix != "alpha" and NETWORK_OF.get(suffix) != network:
            raise KohyaFormatError(f"tensor {key!r} is not part of a plain {TITLES[network]}")
        if name not in places:
            places[name] = module_from_kohya_name(name, layout) if kohya else tuple(name.split(".", 1))
        part, module = places[name]
        if suffix == "alpha":
            alphas.setdefault(part, {})[module] = tensor.float().item()
        else:
            parts.setdefault(part, {})[f"{module}.{suffix}"] = tensor
    for part, tensors in parts.items():
        for module in modules_of(tensors):  # no alpha: LyCORIS reads alpha = rank (scale 1)
            alphas.setdefault(part, {}).setdefault(module, float(rank(tensors, module) or 1))
    return parts, {p: alphas[p] for p in parts}


def network_metadata(parts: dict, alphas: dict) -> dict[str, str]:
    """The ss_network_* header keys LyCORIS's kohya network writes, for what these tensors are."""
    linear, conv = Counter(), Counter()
    network, tucker = None, False
    for part, tensors in parts.items():
        network = network or network_of(tensors)
        for module, alpha in alphas[part].items():
            r = rank(tensors, module)
            (conv if is_spatial_conv(tensors, module) else linear)[(r if r else "full", alpha)] += 1
            tucker = tucker or any(k in _CORES.values() for k in factors(tensors, module))
    dim, alpha = (linear or conv).most_common(1)[0][0]
    args = {"algo": network}
    if conv:
        conv_dim, conv_alpha = conv.most_common(1)[0][0]
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    if tucker:
        args["use_tucker"] = "True"
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
    }


# --- inference -----------------------------------------------------------------------------------------


def load_into_pipeline(pipe, parts: dict, alphas: dict, adapter_name: str) -> None:
    """Put a LoHa/LoKr onto a pipeline's models as peft layers holding these tensors, so that diffusers'
    lora scale (scale_lora_layers, on every peft layer) and fuse_lora work on them as on a LoRA.

    peft shapes each module's factors from its config (rank, LoKr factor); a file's shapes are whatever
    its trainer chose, so the file's tensors replace the ones peft made (peft's forward uses those present)."""
    from peft import LoHaConfig, LoKrConfig

    network = next(network_of(t) for t in parts.values())
    for part, tensors in parts.items():
        model = getattr(pipe, part)
        strip = part.startswith("text_encoder") and not hasattr(model, "text_model")  # (transformers 5)
        paths = {m: m.removeprefix("text_model.") if strip else m for m in alphas[part]}
        config = (LoHaConfig if network == "loha" else LoKrConfig)(
            r=1, alpha=1, target_modules=list(paths.values())
        )
        model.add_adapter(config, adapter_name=adapter_name)
        for module, path in paths.items():
            layer = model.get_submodule(path)
            weight = layer.get_base_layer().weight
            for name in layer.adapter_layer_names:
                if adapter_name in getattr(layer, name):
                    del getattr(layer, name)[adapter_name]
            for name, tensor in factors(tensors, module).items():
                getattr(layer, name)[adapter_name] = torch.nn.Parameter(
                    tensor.to(weight.device, weight.dtype), requires_grad=False
                )
            r = rank(tensors, module)
            layer.r[adapter_name], layer.alpha[adapter_name] = (r, alphas[part][module]) if r else (1, 1.0)
            layer.scaling[adapter_name] = layer.alpha[adapter_name] / layer.r[adapter_name]
