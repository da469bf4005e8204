"""The files written beside the LoRA weights: the resolved arguments and a model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .fileio import atomic_write_text

logger = logging.getLogger(__name__)


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


def save_outputs(args, accelerator, unet, dataset_desc: str, prompts, negatives, weight_dtype, clock) -> None:
    """Final LoRA weights, a validation pass with the saved file, the model card and the arguments
    (main process only); then the upload with --push_to_hub."""
    from .lora import save_kohya_copy, save_lora
    from .validation import validate_saved_lora

    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    with clock.phase("save"):
        model = accelerator.unwrap_model(unet)
        logger.info("saved %s and %s", save_lora(model, output_dir), save_kohya_copy(model, output_dir))
    with clock.phase("validation"):
        grid = validate_saved_lora(args, accelerator, prompts, negatives, weight_dtype)
    write_args(output_dir, args)
    write_model_card(output_dir, args, dataset_desc, prompts, grid)
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(
            args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token
        ).repo_id
        upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            token=args.hub_token,
            ignore_patterns=["checkpoint-*/**", "cache/**", ".*"],
        )
