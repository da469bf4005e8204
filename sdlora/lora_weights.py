"""A LoRA in memory, whatever file it came from, and its two file formats (diffusers' and kohya's).

`LoraWeights` holds peft-named tensors per model part (`unet` or SD 3.5's `transformer`, `text_encoder`,
`text_encoder_2`):
`<module>.lora_A.weight`, `<module>.lora_B.weight` and, for DoRA, `<module>.lora_magnitude_vector`, plus
each module's alpha (the LoRA adds alpha / rank * B @ A, as kohya and diffusers both read it), the model
family when known, and header metadata (`ss_*`, `modelspec.*`) carried into the files it is written to.

    weights = weights_from_models({"unet": unet, "text_encoder": text_encoder}, metadata={...})
    write_diffusers(weights, out / "pytorch_lora_weights.safetensors")  # pipe.load_lora_weights(out)
    write_kohya(weights, out / "pytorch_lora_weights_kohya.safetensors")  # A1111, ComfyUI
    weights = sdlora.lora_files.read_lora(any_lora_file)  # ours or kohya/A1111, SD 1.x / 2.x / SDXL

Text encoder modules are kept under transformers' full CLIP paths (`text_model.encoder.layers.0...`), as
kohya names them and older transformers built them; diffusers drops the `text_model.` root when loading
into a CLIPTextModel that lacks it.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import lycoris
from .errors import UserError
from .families import SD1, SDXL, Family, family_of_denoiser, family_of_lora
from .fileio import atomic_file
from .kohya import (
    LORA_A,
    LORA_B,
    MAGNITUDE,
    SDXL_LAYOUT,
    KohyaFormatError,
    SgmLayout,
    from_kohya,
    is_conv3,
    network_metadata,
    to_kohya,
)

# The denoiser parts (SD 3.5's is a transformer); the others are text encoders.
DENOISERS = ("unet", "transformer")
PARTS = (*DENOISERS, "text_encoder", "text_encoder_2")
# diffusers' header key for the adapter configs (loaders.lora_base.LORA_ADAPTER_METADATA_KEY)
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# Header keys that describe one file's tensors; recomputed when writing, so not carried from a file read.
_DERIVED_KEYS = {
    "format",
    ADAPTER_METADATA_KEY,
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
}


@dataclass
class LoraWeights:
    """A LoRA's tensors under peft names per model part, each module's alpha, its family and header metadata."""

    parts: dict[str, dict[str, torch.Tensor]]
    alphas: dict[str, dict[str, float]]  # part -> module path -> alpha (float32 values, as kohya stores them)
    family: Family | None = None  # None: neither the file's names nor its shapes tell
    metadata: dict[str, str] = field(default_factory=dict)
    sgm_layout: SgmLayout | None = None  # the UNet's layout for kohya's SDXL names (None: SDXL's own)
    network: str = "lora"  # or LyCORIS's loha / lokr, their tensors under peft's names (sdlora/lycoris.py)

    def modules(self, part: str) -> list[str]:
        return list(self.alphas.get(part, {}))

    def down(self, part: str, module: str) -> torch.Tensor:
        return self.parts[part][module + LORA_A]

    def up(self, part: str, module: str) -> torch.Tensor:
        return self.parts[part][module + LORA_B]

    def magnitude(self, part: str, module: str) -> torch.Tensor | None:
        return self.parts[part].get(module + MAGNITUDE)

    def rank(self, part: str, module: str) -> int | None:
        """The rank alpha is divided by (None: a LoKr of two full matrices, scale 1)."""
        if self.network != "lora":
            return lycoris.rank(self.parts[part], module)
        return self.down(part, module).shape[0]

    def delta(self, part: str, module: str) -> torch.Tensor:
        """What the LoRA adds to the module's weight (before DoRA's normalisation): alpha / rank * B @ A (LoHa,
        LoKr: lycoris.delta, flattened to (out, in * kh * kw) for a non-Tucker conv)."""
        if self.network != "lora":
            return lycoris.delta(self.parts[part], module, self.alphas[part][module])
        down, up = self.down(part, module), self.up(part, module)
        scale = self.alphas[part][module] / down.shape[0]
        # (out, r) @ (r, in * kh * kw), back to the weight's shape (out, in[, kh, kw])
        return (scale * up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    @property
    def kohya_names(self):
        """How kohya's files name this LoRA's modules (kohya.KohyaNames): its family's, in its UNet's layout."""
        return (self.family or SD1).kohya_names.with_layout(self.sgm_layout)

    def is_dora(self, part: str | None = None) -> bool:
        tensors = [self.parts[part]] if part else self.parts.values()
        return any(k.endswith(MAGNITUDE) for t in tensors for k in t)

    def is_conv(self, part: str, module: str) -> bool:
        """Whether the module is a spatial convolution (kohya's conv_dim), not a Linear or 1x1 layer."""
        if self.network != "lora":
            return lycoris.is_spatial_conv(self.parts[part], module)
        return is_conv3(self.down(part, module))

    def has_conv(self) -> bool:
        """Whether it adapts spatial convolutions (kohya's LoCon), not only Linear and 1x1 layers."""
        return any(self.is_conv(p, m) for p in self.parts for m in self.modules(p))

    def adapter_type(self) -> str:
        if self.network != "lora":
            return lycoris.title(self.parts)
        kind = "LoCon" if self.has_conv() else "LoRA"
        return f"DoRA ({kind})" if self.is_dora() else kind


def float32(value: float) -> float:
    """The value as float32 holds it: kohya files store alphas so, and every alpha is kept so for exact round trips."""
    return torch.tensor(float(value), dtype=torch.float32).item()


def _te_path(module: str) -> str:
    """transformers' full CLIP path: CLIPTextModel in transformers 5 has no `text_model.` root any more."""
    return module if module.startswith(("text_model.", "text_projection")) else f"text_model.{module}"


def _canonical(part: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if part in DENOISERS:
        return tensors
    return {_te_path(k): v for k, v in tensors.items()}


def _modules_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k.removesuffix(LORA_A) for k in tensors if k.endswith(LORA_A)] + lycoris.modules_of(tensors)


def weights_from_models(
    models: dict[str, torch.nn.Module],
    family: Family | None = None,
    metadata: dict[str, str] | None = None,
    adapter_name: str = "default",
) -> LoraWeights:
    """The LoRA adapter of peft-adapted models (part name -> model), as fp32 CPU tensors.

    Each module's alpha is what peft resolved for it from the adapter's r, lora_alpha, rank_pattern and
    alpha_pattern (kept on the layer), so conv ranks and alphas set by pattern come out right. The family
    is guessed from the models when not given (text_encoder_2: sdxl; linear projections: sd2; else sd1).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    parts, alphas = {}, {}
    for part, model in models.items():
        if part not in PARTS:
            raise ValueError(f"model part {part!r}: use one of {', '.join(PARTS)}")
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every name
        # (save_embedding_layers=False: no embeddings are adapted; "auto" looks for a config and warns)
        state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        module_alphas = lycoris.layer_alphas(model, adapter_name)  # (LoHa/LoKr layers; LoRA's below)
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                alpha, rank = layer.lora_alpha[adapter_name], layer.r[adapter_name]
                # rsLoRA scales by alpha / sqrt(r); files say alpha / r, so store the alpha that gives that scale
                rslora = layer.use_rslora.get(adapter_name, False)
                module_alphas[name] = float32(alpha * math.sqrt(rank) if rslora else alpha)
        if set(module_alphas) != set(_modules_of(tensors)):
            raise ValueError(f"{part}: LoRA layers and adapter weights disagree; pass the unwrapped model")
        if part not in DENOISERS:
            module_alphas = {_te_path(m): a for m, a in module_alphas.items()}
        parts[part], alphas[part] = _canonical(part, tensors), module_alphas
    denoiser = next((models[p] for p in DENOISERS if p in models), None)
    if family is None and denoiser is not None:
        family = family_of_denoiser(denoiser.config)
    elif family is None and "text_encoder_2" in models:
        family = SDXL
    layout = family.sgm_layout(denoiser.config) if family is not None and denoiser is not None else None
    network = lycoris.network_of(k for tensors in parts.values() for k in tensors) or "lora"
    return LoraWeights(parts, alphas, family, dict(metadata or {}), layout, network)


# --- diffusers format --------------------------------------------------------------------------------


def adapter_config(weights: LoraWeights, part: str) -> dict:
    """The peft LoraConfig of one part, as diffusers' save_lora_weights stores it (lora_adapter_metadata).

    r and lora_alpha are the most common; other modules' go to rank_pattern / alpha_pattern. Text encoder
    paths lose their `text_model.` root there, since peft matches patterns as path suffixes and
    transformers 5's CLIPTextModel has no such root.
    """
    from peft import LoraConfig

    def pattern(module: str) -> str:
        return module if part in DENOISERS else module.removeprefix("text_model.")

    ranks = {m: weights.rank(part, m) for m in weights.modules(part)}
    alphas = weights.alphas[part]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(pattern(m) for m in ranks),
        rank_pattern={pattern(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={pattern(m): v for m, v in alphas.items() if v != alpha},
        use_dora=weights.is_dora(part),
    )
    return config.to_dict()


def _file_metadata(weights: LoraWeights) -> dict[str, str]:
    """A file's header: the weights' metadata, with the ss_network_* keys computed from the tensors (they
    describe this file) and any ss_network_args of the trainer's (e.g. its layer set) kept beside them."""
    metadata = _with_family(weights)
    describe = network_metadata if weights.network == "lora" else lycoris.network_metadata
    derived = describe(weights.parts, weights.alphas)
    args = {
        **json.loads(derived.get("ss_network_args", "{}")),
        **json.loads(metadata.get("ss_network_args", "{}")),
    }
    metadata.update(derived)
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def _with_family(weights: LoraWeights) -> dict[str, str]:
    metadata = dict(weights.metadata)
    if weights.family and "ss_base_model_version" not in metadata:
        # (the trainer passes its own, which knows SD 2's prediction type: sd_v2_v for v-prediction)
        metadata["ss_base_model_version"] = weights.family.base_model_version("epsilon")
    return metadata


# Text encoder DoRA magnitudes are written as `<module>.lora_magnitude_vector.weight`, not as peft saves them
# (without `.weight`): transformers 5's load_adapter, which diffusers loads text encoders with, renames
# `lora_*` keys to `lora_*.<adapter>` (peft 0.21's build_peft_weight_mapping) and so misses the `.weight` of
# DoRA's magnitude module, leaving it at its initial value. peft's own set_peft_model_state_dict reads both.
_TE_MAGNITUDE = MAGNITUDE + ".weight"


def write_diffusers(weights: LoraWeights, path: str | Path) -> Path:
    """Write the diffusers-format file (`pipe.load_lora_weights` reads it), with the adapter configs and metadata.

    diffusers' own save_lora_weights writes it first, so keys and `lora_adapter_metadata` are as diffusers
    expects; the metadata is added to that header and the file appears atomically.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    if weights.network != "lora":  # (no diffusers format: peft's names, sdlora/lycoris.py)
        return _save(lycoris.to_parts(weights.parts, weights.alphas), path, _file_metadata(weights))
    family = weights.family or (SDXL if "text_encoder_2" in weights.parts else SD1)
    strays = [p for p in weights.parts if p != family.denoiser and p not in family.text_encoders]
    if strays:
        raise ValueError(f"{strays[0]} LoRA layers in a {family.title} LoRA")
    pipeline = family.pipeline_class
    kwargs = {}
    for part, tensors in weights.parts.items():
        if part not in DENOISERS:  # see _TE_MAGNITUDE
            tensors = {k + ".weight" if k.endswith(MAGNITUDE) else k: v for k, v in tensors.items()}
        kwargs[f"{part}_lora_layers"] = tensors
        kwargs[f"{part}_lora_adapter_metadata"] = adapter_config(weights, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-") as tmp:
        pipeline.save_lora_weights(tmp, safe_serialization=True, weight_name="lora.safetensors", **kwargs)
        with safe_open(str(Path(tmp) / "lora.safetensors"), framework="pt", device="cpu") as f:
            names, header = f.keys(), dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in names}
    header.update(_file_metadata(weights))
    with atomic_file(path) as tmp_file:
        save_file(tensors, str(tmp_file), metadata=header)
    return path


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module path it ends (at a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _from_diffusers(path: str | Path, state: dict[str, torch.Tensor], header: dict[str, str]):
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        if part not in PARTS:
            raise UserError(f"{path}: LoRA layers for a model part sdlora does not know ({key!r})")
        if key.endswith(".alpha"):
            raise UserError(f"{path}: alpha tensors in a diffusers-format file ({key!r}) are not supported")
        by_part.setdefault(part, {})[rest] = tensor
    configs: dict[str, dict] = {}
    for key, value in json.loads(header.get(ADAPTER_METADATA_KEY, "{}")).items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    parts, alphas = {}, {}
    for part, tensors in by_part.items():
        if part in DENOISERS:
            tensors = convert_unet_state_dict_to_peft(tensors)
        else:  # the same conversions as diffusers' text encoder loader
            tensors = _canonical(part, convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors)))
            tensors = {
                k.removesuffix(".weight") if k.endswith(_TE_MAGNITUDE) else k: v for k, v in tensors.items()
            }
        strays = [k for k in tensors if not k.endswith((LORA_A, LORA_B, MAGNITUDE))]
        modules = _modules_of(tensors)
        if strays or any(m + LORA_B not in tensors for m in modules):
            what = f"{strays[0]!r} is" if strays else "some modules have no lora_B and are"
            raise UserError(f"{path}: {what} not part of a plain LoRA/DoRA (LoRA biases are not supported)")
        config = configs.get(part, {})
        module_alphas = {}
        for module in modules:
            rank = tensors[module + LORA_A].shape[0]
            # no adapter config: diffusers loads it with alpha = rank (scale 1)
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
            module_alphas[module] = float32(alpha * math.sqrt(rank) if config.get("use_rslora") else alpha)
        parts[part], alphas[part] = tensors, module_alphas
    return parts, alphas


def weights_from_file(
    name: str | Path,
    state: dict[str, torch.Tensor],
    header: dict[str, str],
    kohya: bool,
    sgm_layout: SgmLayout | None = None,
) -> LoraWeights:
    """A LoRA file's tensors and header (kohya or diffusers names) as LoraWeights; UserError naming `name`.

    kohya's SDXL block numbers are read with `sgm_layout` (SDXL's own when None). Files are read, safely
    and with their format told, by sdlora.lora_files.read_lora.
    """
    network = lycoris.network_of(state) or "lora"
    if kohya or network != "lora":
        try:
            read = from_kohya if network == "lora" else lambda s, layout: lycoris.from_file(s, kohya, layout)
            parts, alphas = read(state, sgm_layout or SDXL_LAYOUT)
        except KohyaFormatError as e:
            raise UserError(f"{name}: {e}") from None
    else:
        parts, alphas = _from_diffusers(name, state, header)
    family = family_of_lora(header, list(state) if kohya else [], parts)
    if kohya and family is not None and network == "lora":  # SD 3.5's kohya names: kohya_sd3.py
        try:
            parts, alphas = family.kohya_names.from_kohya_parts(parts, alphas)
        except KohyaFormatError as e:
            raise UserError(f"{name}: {e}") from None
    metadata = {k: v for k, v in header.items() if k not in _DERIVED_KEYS}
    order = [p for p in PARTS if p in parts]  # the denoiser first, whatever order the file's keys sort in
    parts, alphas = {p: parts[p] for p in order}, {p: alphas[p] for p in order}
    return LoraWeights(parts, alphas, family, metadata, sgm_layout, network)


# --- kohya format ------------------------------------------------------------------------------------


def write_kohya(weights: LoraWeights, path: str | Path) -> Path:
    """Write the kohya/A1111/ComfyUI file: kohya names (SGM blocks for SDXL), alphas, dora_scale, ss_* metadata.

    The ss_network_* keys are computed from the tensors (they describe this file), the rest of the
    metadata is the weights' own.
    """
    path = Path(path)
    try:
        writer = to_kohya if weights.network == "lora" else lycoris.to_kohya  # (LoHa/LoKr: LyCORIS's format)
        tensors = writer(weights.parts, weights.alphas, weights.kohya_names)
    except KohyaFormatError as e:
        raise UserError(f"{path}: cannot write it in kohya's format: {e}") from None
    return _save(tensors, path, _file_metadata(weights))


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
