"""`fuse`: the base model with a LoRA baked into its weights, saved as a diffusers folder."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from ..errors import UserError
from ..families import detect_family
from ..fileio import atomic_directory
from ..generation import inference_scheduler, lora_prediction_type, lora_zero_terminal_snr
from ..layout import LORA_WEIGHT_NAME
from ..lora_files import check_family, check_fits, find_lora_file, read_lora
from ..lora_weights import write_diffusers
from ..lycoris import load_into_pipeline
from ..models import resolve_model


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
    """Save the base model with the LoRA baked into its weights (diffusers' fuse_lora, then unload), with
    the scheduler sampling the prediction type the LoRA was trained for, as load_pipeline samples it."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it, or another --output")
    lora_file = find_lora_file(lora)
    weights = read_lora(lora_file)
    model = resolve_model(base_model)
    check_family(weights, detect_family(model), str(lora), model)  # before the model loads
    pipe = load_base_pipeline(model)
    check_fits(weights, pipe, str(lora))
    with tempfile.TemporaryDirectory() as tmp, _quiet_loading():
        if weights.network == "lora":
            write_diffusers(weights, Path(tmp) / LORA_WEIGHT_NAME)
            pipe.load_lora_weights(tmp, adapter_name="fused")
        else:  # LoHa/LoKr: peft's layers (diffusers loads LoRA only); fuse_lora merges any peft layer
            load_into_pipeline(pipe, weights.parts, weights.alphas, "fused")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
        pipe.unload_lora_weights()
    # A v-prediction LoRA of an epsilon base (or the reverse) predicts v: the saved model must sample it so.
    prediction_type, zero_snr = lora_prediction_type(lora_file), lora_zero_terminal_snr(lora_file)
    if prediction_type or zero_snr:
        pipe.scheduler = inference_scheduler(model, prediction_type, zero_terminal_snr=zero_snr)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return output
