"""LoRA files for inference: find them, read them safely, tell their format, check they fit, load them.

Three formats are accepted, all handed to diffusers' `load_lora_weights`, which converts them itself:

- ours (diffusers): `unet.<module>.lora.down.weight` / `.lora.up.weight` in `pytorch_lora_weights.safetensors`,
  with the adapter's settings (lora_alpha) in the file's header; `sdlora.lora.save_lora_files` writes it for the
  final weights and for every `checkpoint-N/`.
- kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight` and `.alpha`
  (also `lora_te_...` for the text encoder), in a `.safetensors` file.
- the original toolkit's `pytorch_lora_weights.bin` (diffusers' attention-processor format, `unet.save_attn_procs`):
  `<module>.processor.to_q_lora.down.weight`, without the `unet.` prefix current diffusers expects.

Pickle-based files (.bin, .pt, ...) are read here with `torch.load(weights_only=True)` and only the tensors
are passed on: a pickle can run code when loaded, and diffusers would read a .bin path without that guard.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .families import family_of_pipeline
from .kohya import SgmLayout
from .layout import LORA_WEIGHT_NAME, list_checkpoints
from .lora_weights import ADAPTER_METADATA_KEY, DENOISERS, LoraWeights, weights_from_file
from .lycoris import load_into_pipeline, network_of

OLD_LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"  # what the original toolkit wrote
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
ADAPTER_NAME = "lora"

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_ATTN_PROCS_KEY = re.compile(r"\.processor\.|_lora\.(down|up)\.")
_DIFFUSERS_KEY = re.compile(
    r"\.lora(_linear_layer)?\.(down|up)\.|\.lora_[AB]\.|\.lora_magnitude_vector|\.(hada|lokr)_[wt]"
)  # (hada_*, lokr_*: our LoHa/LoKr files, sdlora/lycoris.py)
_FORMAT_NAMES = {
    "diffusers": "diffusers format",
    "kohya": "kohya/A1111 format",
    "attn-procs": "old diffusers attention-processor format",
}
_HOW_TO_PASS = "pass a training output folder, a checkpoint-N folder or a LoRA .safetensors file"


@dataclass
class LoraFile:
    """A LoRA file's tensors, ready for diffusers (old-format keys already prefixed)."""

    path: Path
    format: str  # "diffusers", "kohya" or "attn-procs"
    state_dict: dict[str, torch.Tensor]
    has_adapter_metadata: bool = False  # lora_alpha etc. in the safetensors header


@dataclass
class LoadedLora:
    """What was loaded into a pipeline: the file, its format and the number of layers per model part."""

    path: Path
    format: str
    layers: dict[str, int] = field(default_factory=dict)
    kind: str = "LoRA"  # or LoHa, LoKr

    def describe(self) -> str:
        parts = ", ".join(f"{n} layers in the {part.replace('_', ' ')}" for part, n in self.layers.items())
        fmt = (
            "peft-named format"
            if self.kind != "LoRA" and self.format == "diffusers"
            else _FORMAT_NAMES[self.format]
        )
        return f"{self.kind} {self.path} ({fmt}: {parts})"


def find_lora_file(path: str | Path) -> Path:
    """The weights file for a training output folder, a checkpoint-N folder, or a file given directly."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; {_HOW_TO_PASS}")
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
            raise UserError(
                f"{path}: not a LoRA weights file (expected .safetensors or .bin); {_HOW_TO_PASS}"
            )
        return path
    for name in (LORA_WEIGHT_NAME, OLD_LORA_WEIGHT_NAME):
        if (path / name).is_file():
            return path / name
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:  # a folder holding one downloaded kohya/A1111 file
        return files[0]
    checkpoints = list_checkpoints(path)
    hint = f" (training did not finish? the newest checkpoint is {checkpoints[-1][1]})" if checkpoints else ""
    raise UserError(f"{path}: no {LORA_WEIGHT_NAME} in this folder{hint}; {_HOW_TO_PASS}")


def _read_tensors(path: Path) -> tuple[dict, bool]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names, metadata = f.keys(), f.metadata() or {}
                return {k: f.get_tensor(k) for k in names}, ADAPTER_METADATA_KEY in metadata
        except (SafetensorError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{path}: not a readable safetensors file ({reason}); copy or download it again"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: refused: it holds Python objects, not only tensors, and pickle files are loaded with "
            "weights_only=True because they can run code; use a .safetensors file from a source you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({reason})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a LoRA: it holds a {type(state).__name__}, not a dict of tensors")
    return state, False


def lora_format(keys: list[str]) -> str | None:
    """'kohya', 'attn-procs' or 'diffusers' from the key names; None when they are not LoRA keys."""
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(_ATTN_PROCS_KEY.search(k) for k in keys):
        return "attn-procs"
    if any(_DIFFUSERS_KEY.search(k) for k in keys):
        return "diffusers"
    return None


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a LoRA file's tensors (pickles with weights_only=True) and tell its format; UserError if it is no LoRA."""
    path = Path(path)
    state, has_metadata = _read_tensors(path)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not state or not_tensors:
        what = (
            f"{not_tensors[0]!r} is a {type(state[not_tensors[0]]).__name__}"
            if not_tensors
            else "it is empty"
        )
        raise UserError(f"{path}: not a LoRA file ({what}, not a tensor)")
    keys = list(state)
    fmt = lora_format(keys)
    if fmt is None:
        raise UserError(
            f"{path}: not a LoRA file: none of its {len(keys)} tensor names is a LoRA layer's (e.g. {keys[0]!r})"
        )
    strays = [k for k in keys if "lora" not in k and not k.endswith(".alpha") and not network_of([k])]
    if strays:
        raise UserError(f"{path}: not a plain LoRA file: it also holds other weights (e.g. {strays[0]!r})")
    if fmt == "attn-procs":
        # Written without the model-part prefix when the UNet was the only part with LoRA layers.
        state = {k if k.startswith(("unet.", "text_encoder.")) else f"unet.{k}": v for k, v in state.items()}
    return LoraFile(path, fmt, state, has_metadata)


def _misfit(model: torch.nn.Module, part: str, module: str, weights) -> str | None:
    """Why this LoRA layer cannot go onto the model, or None if it fits."""
    path = module if part in DENOISERS or hasattr(model, "text_model") else module.removeprefix("text_model.")
    try:
        weight = model.get_submodule(path).weight  # (out, in, *kernel)
    except AttributeError:
        return f"layer {module!r} is not in this model"
    delta = weights.delta(part, module)  # (out, in, *kernel) as the LoRA would add it
    if (
        delta.ndim < weight.ndim and delta.shape[1] == weight[0].numel()
    ):  # (LoHa/LoKr convs: (out, in * kh * kw))
        delta = delta.reshape(weight.shape)
    if delta.shape[1:] != weight.shape[1:]:
        return f"layer {module!r} takes {tuple(weight.shape[1:])} inputs, the LoRA's {tuple(delta.shape[1:])}"
    if delta.shape[0] != weight.shape[0]:
        return f"layer {module!r} has {weight.shape[0]} outputs, the LoRA's {delta.shape[0]}"
    magnitude = weights.magnitude(part, module)
    if magnitude is not None and magnitude.numel() != weight.shape[0]:  # (out,), or (1, out, 1, 1) for convs
        return (
            f"layer {module!r} has {weight.shape[0]} outputs, the LoRA's DoRA magnitude {magnitude.numel()}"
        )
    return None


def check_fits(weights, pipe, lora_name: str) -> dict[str, int]:
    """Number of LoRA layers per model part (weights: lora_weights.LoraWeights); UserError naming a part or
    layer that the pipeline lacks or that differs in shape.

    Checked before loading because diffusers skips unknown layers with a warning and reports a shape
    mismatch as a long peft traceback.
    """
    counts = {}
    for part in weights.parts:
        model = getattr(pipe, part, None)
        if model is None:
            raise UserError(
                f"{lora_name}: not a LoRA for this base model: it has {part.replace('_', ' ')} layers, which "
                f"{pipe.name_or_path} lacks; was it made for another family?"
            )
        modules = weights.modules(part)
        misfits = [why for module in modules if (why := _misfit(model, part, module, weights))]
        if misfits:
            raise UserError(
                f"{lora_name}: not a LoRA for this base model: {len(misfits)} of its {len(modules)} "
                f"{part.replace('_', ' ')} layers do not fit ({misfits[0]}); was it trained on another model?"
            )
        counts[part] = len(modules)
    if not any(counts.values()):
        raise UserError(f"{lora_name}: not a LoRA file: it holds no LoRA layers")
    return counts


@contextlib.contextmanager
def _diffusers_errors_only():
    # diffusers warns "No LoRA keys associated to CLIPTextModel found" for every UNet-only LoRA (all of
    # ours); check_fits has already checked and counted what the file holds.
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def check_family(weights, family, lora_name: str, model_name: str) -> None:
    """UserError naming the LoRA when it was made for another family (families.Family) than the base model's."""
    if weights.family and weights.family is not family:
        raise UserError(
            f"{lora_name}: a LoRA for {weights.family.title}, but {model_name} is "
            f"{family.title}; use a base model of the LoRA's family"
        )


def load_lora(pipe, path: str | Path, lora: LoraFile | None = None) -> LoadedLora:
    """Load a LoRA (folder or file, any accepted format) into a Stable Diffusion pipeline as adapter 'lora'."""
    import tempfile

    lora = lora or read_lora_file(find_lora_file(path))
    weights = weights_of(lora)
    family = family_of_pipeline(pipe)
    check_family(weights, family, str(lora.path), pipe.name_or_path)
    layers = check_fits(weights, pipe, str(lora.path))
    if weights.network != "lora":  # LoHa/LoKr: peft's layers, put on by us (diffusers loads LoRA only)
        load_into_pipeline(pipe, weights.parts, weights.alphas, ADAPTER_NAME)
        return LoadedLora(lora.path, lora.format, layers, weights.adapter_type())
    with tempfile.TemporaryDirectory(prefix="sdlora-") as tmp:
        # Our files keep lora_alpha in the safetensors header, which diffusers reads only from a path (a dict
        # would get alpha = rank). A safetensors path is safe to hand over; everything else goes as tensors.
        source = str(lora.path) if lora.has_adapter_metadata else lora.state_dict
        dora = any(k.endswith(".dora_scale") for k in lora.state_dict)
        if lora.format == "kohya" and (dora or not family.kohya_names.diffusers_reads):
            # diffusers' kohya loader drops DoRA's dora_scale (with a warning), and has no converter for SD 3.5's
            # kohya names: go through our own reader, which keeps both, and the diffusers-format writer.
            from .lora_weights import write_diffusers

            source = str(write_diffusers(weights, Path(tmp) / "lora.safetensors"))
        try:
            with _diffusers_errors_only():
                pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME)
        except (ValueError, RuntimeError, KeyError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{lora.path}: diffusers could not load this LoRA ({reason})") from None
    return LoadedLora(lora.path, lora.format, layers)


def read_header(path: str | Path) -> dict[str, str]:
    """A .safetensors file's header metadata (ss_*, modelspec.*, lora_adapter_metadata); {} for other files."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def read_lora(path: str | Path, sgm_layout: SgmLayout | None = None) -> LoraWeights:
    """Any LoRA file or folder (ours, kohya/A1111 for SD 1.x/2.x/SDXL, the old .bin) as format-independent
    LoraWeights: peft-named tensors, every module's alpha, the family when it can be told, the header.

    kohya's SDXL block numbers are read with `sgm_layout` (kohya.SgmLayout; SDXL's own when None).
    """
    return weights_of(read_lora_file(find_lora_file(path)), sgm_layout)


def weights_of(lora: LoraFile, sgm_layout: SgmLayout | None = None) -> LoraWeights:
    """A LoRA file already read (read_lora_file) as LoraWeights, without reading its tensors again."""
    return weights_from_file(
        lora.path, lora.state_dict, read_header(lora.path), lora.format == "kohya", sgm_layout
    )
