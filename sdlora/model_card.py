"""The files written beside the LoRA weights: the resolved arguments and a model card."""

from __future__ import annotations

import json
from pathlib import Path

from .fileio import atomic_write_text


def write_args(output_dir: Path, args) -> None:
    """The resolved configuration as JSON (data only: never executed or unpickled)."""
    values = {
        k: v
        for k, v in sorted(vars(args).items())
        if isinstance(v, (str, int, float, bool, list, type(None)))
    }
    atomic_write_text(output_dir / "args.json", json.dumps(values, indent=2) + "\n")


def write_model_card(output_dir: Path, args, dataset_desc: str, prompts: list[str], grid: str | None) -> None:
    """README.md in the Hugging Face model-card format: base model, data, hyperparameters, samples."""
    lines = [
        "---",
        f"base_model: {args.pretrained_model_name_or_path}",
        "library_name: diffusers",
        "tags: [stable-diffusion, text-to-image, diffusers, lora]",
        "---",
        "",
        f"# LoRA for {args.pretrained_model_name_or_path}",
        "",
        f"Trained on {dataset_desc} with the sdlora toolkit.",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in (
        "rank",
        "lora_alpha",
        "resolution",
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
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
        f'pipe.load_lora_weights("{output_dir}")',
        "```",
        "",
    ]
    if prompts:
        lines += ["## Validation prompts", ""] + [f"- {p}" for p in prompts] + [""]
    if grid:
        lines += [f"![validation images]({grid})", ""]
    atomic_write_text(output_dir / "README.md", "\n".join(lines))
