"""The files written beside the LoRA weights: the resolved arguments and a model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .fileio import atomic_write_text
from .lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from .metadata import trigger_words

logger = logging.getLogger(__name__)


def write_args(output_dir: Path, args) -> None:
    """The resolved configuration as JSON (data only: never executed or unpickled)."""
    values = {
        k: v
        for k, v in sorted(vars(args).items())
        if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
    }
    atomic_write_text(output_dir / "args.json", json.dumps(values, indent=2) + "\n")


def write_model_card(
    output_dir: Path,
    args,
    family,
    dataset_desc: str,
    prompts: list[str],
    grid: str | None,
    extra: list[str] = (),
) -> None:
    """README.md in the Hugging Face model-card format: base model, what was trained, data,
    hyperparameters, which file to use where, samples."""
    spec = args.adapter_spec
    words = trigger_words(args.caption_prefix)
    lines = [
        "---",
        f"base_model: {args.pretrained_model_name_or_path}",
        "library_name: diffusers",
        f"tags: [stable-diffusion, {family.name}, text-to-image, diffusers, lora]",
        *([f"instance_prompt: {words[0]}"] if words else []),
        "---",
        "",
        f"# LoRA for {args.pretrained_model_name_or_path}",
        "",
        f"A {spec.adapter_type} for a {family.title} model, trained on {dataset_desc} with the sdlora toolkit.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| adapter | {spec.adapter_type} |",
        f"| layers | {args.lora_layers}{' + text encoder' if args.train_text_encoder else ''} |",
        f"| trigger words | {', '.join(words) if words else '-'} |",
    ]
    for key in (
        "rank",
        "lora_alpha",
        "resolution",
        "crop_mode",
        "prediction_type",
        "train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "lr_scheduler",
        "max_train_steps",
        "mixed_precision",
        "use_8bit_adam",
        "snr_gamma",
        "seed",
    ):
        lines.append(f"| {key} | {getattr(args, key, None)} |")
    lines += [
        "",
        "## Files",
        "",
        f"- `{LORA_WEIGHT_NAME}`: diffusers (`pipe.load_lora_weights(folder)`) and `python -m sdlora.generate`.",
        f"- `{KOHYA_WEIGHT_NAME}`: the same weights under kohya's names, with kohya's metadata: copy it into "
        "AUTOMATIC1111's `models/Lora` or ComfyUI's `models/loras`.",
        "- `checkpoint-<step>/`: the same two files at that step, plus the state to resume training.",
        "",
        "## Use",
        "",
        "```python",
        f"from diffusers import {family.pipeline_class_name}",
        "",
        f'pipe = {family.pipeline_class_name}.from_pretrained("{args.pretrained_model_name_or_path}")',
        f'pipe.load_lora_weights("{output_dir}")',
        "```",
        "",
    ]
    lines += list(extra)
    if prompts:
        lines += ["## Validation prompts", ""] + [f"- {p}" for p in prompts] + [""]
    if grid:
        lines += [f"![validation images]({grid})", ""]
    atomic_write_text(output_dir / "README.md", "\n".join(lines))
