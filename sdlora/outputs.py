"""The files written beside the LoRA weights: the resolved arguments and a model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .fileio import atomic_write_text
from .layout import ARGS_FILE, CARD_FILE, CONFIG_FILE, KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME
from .metadata import trigger_words

logger = logging.getLogger(__name__)


def write_config(output_dir: Path, resolved, values: dict) -> None:
    """config.toml (the resolved configuration, which `--config` reads: the same run again, bit for bit on a
    CPU) and args.json (the same values as JSON). Data only: never executed or unpickled; no token."""
    from .config.flags import flat_values, to_toml

    header = (
        "The resolved configuration of this run. Re-run it with:\n"
        f"  accelerate launch train_text_to_image_lora.py --config {output_dir / CONFIG_FILE} --output_dir NEW_FOLDER"
    )
    atomic_write_text(output_dir / CONFIG_FILE, to_toml(flat_values(resolved, include_per_run=False), header))
    atomic_write_text(output_dir / ARGS_FILE, json.dumps(values, indent=2) + "\n")


def write_model_card(
    output_dir: Path,
    cfg,
    settings,
    dataset_desc: str,
    prompts: list[str],
    grid: str | None,
    extra: list[str] = (),
) -> None:
    """README.md in the Hugging Face model-card format: base model, what was trained, data,
    hyperparameters, which file to use where, samples (cfg: config.train.TrainConfig, settings:
    training.settings.RunSettings)."""
    spec, family, model = settings.adapter, settings.family, settings.model
    words = trigger_words(cfg.captions.caption_prefix)
    lines = [
        "---",
        f"base_model: {model}",
        "library_name: diffusers",
        f"tags: [stable-diffusion, {family.name}, text-to-image, diffusers, lora]",
        *([f"instance_prompt: {words[0]}"] if words else []),
        "---",
        "",
        f"# LoRA for {model}",
        "",
        f"A {spec.adapter_type} for a {family.title} model, trained on {dataset_desc} with the sdlora toolkit.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| adapter | {spec.adapter_type} |",
        f"| layers | {spec.layers}{' + text encoder' if spec.text_encoder else ''} |",
        f"| trigger words | {', '.join(words) if words else '-'} |",
    ]
    opt, schedule = cfg.optimization, settings.schedule
    rows = {
        "rank": spec.rank,
        "lora_alpha": spec.alpha,
        "resolution": settings.resolution,
        "crop_mode": settings.buckets.mode,
        "prediction_type": settings.prediction_type,
        "train_batch_size": opt.train_batch_size,
        "gradient_accumulation_steps": opt.gradient_accumulation_steps,
        "learning_rate": schedule.learning_rate,
        "lr_scheduler": opt.lr_scheduler,
        "max_train_steps": schedule.max_train_steps,
        "mixed_precision": settings.mixed_precision,
        "use_8bit_adam": opt.use_8bit_adam,
        "snr_gamma": cfg.objective.snr_gamma,
        "seed": opt.seed,
    }
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
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
        f'pipe = {family.pipeline_class_name}.from_pretrained("{model}")',
        f'pipe.load_lora_weights("{output_dir}")',
        "```",
        "",
    ]
    lines += list(extra)
    if prompts:
        lines += ["## Validation prompts", ""] + [f"- {p}" for p in prompts] + [""]
    if grid:
        lines += [f"![validation images]({grid})", ""]
    atomic_write_text(output_dir / CARD_FILE, "\n".join(lines))
