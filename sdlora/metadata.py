"""The training metadata written into every LoRA file's header, in kohya's (`ss_*`) and the SAI model
spec's (`modelspec.*`) vocabularies: A1111 lists a LoRA under the right base models from
`ss_base_model_version`, and shows the rest in its metadata view. Values are strings, as the
safetensors header requires."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunInfo:
    """What the metadata says about the run beyond its arguments."""

    family: object  # families.Family
    num_train_images: int
    bucket_info: dict
    tag_frequency: dict[str, int]
    started_at: float = field(default_factory=time.time)


def lora_metadata(args, run: RunInfo, step: int, epoch: int) -> dict[str, str]:
    """Every header key for the LoRA as of `step` (a checkpoint's or the final one's)."""
    family, prediction = run.family, args.prediction_type
    spec = args.adapter_spec
    network_args = {
        "lora_layers": args.lora_layers,
        "conv_dim": str(spec.conv_rank or spec.rank) if args.lora_layers == "all" else None,
        "conv_alpha": str(
            spec.conv_alpha if spec.conv_alpha is not None else float(spec.conv_rank or spec.rank)
        )
        if args.lora_layers == "all"
        else None,
        "dora_wd": "True" if spec.use_dora else None,
        "dropout": str(spec.dropout) if spec.dropout else None,
        "target_modules": list(args.lora_target_modules) if args.lora_target_modules else None,
    }
    output_name = Path(args.output_dir).name
    width = height = args.resolution
    meta = {
        "ss_network_args": json.dumps({k: v for k, v in network_args.items() if v is not None}),
        "ss_base_model_version": family.base_model_version(prediction),
        "ss_v2": str(family.name == "sd2"),
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_sd_model_name": args.pretrained_model_name_or_path,
        "ss_output_name": output_name,
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": str(run.num_train_images),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr if args.unet_lr is not None else args.learning_rate),
        "ss_text_encoder_lr": str(
            args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
        )
        if args.train_text_encoder
        else "0",
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_batch_size_per_device": str(args.train_batch_size),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_mixed_precision": str(args.mixed_precision),
        "ss_seed": str(args.seed),
        "ss_enable_bucket": str(args.crop_mode == "bucket"),
        "ss_bucket_no_upscale": str(args.bucket_no_upscale),
        "ss_min_bucket_reso": str(args.min_bucket_reso),
        "ss_max_bucket_reso": str(args.max_bucket_reso),
        "ss_caption_dropout_rate": str(args.caption_dropout_rate),
        "ss_shuffle_caption": str(args.shuffle_caption),
        "ss_keep_tokens": str(args.keep_tokens),
        "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.snr_gamma),
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_bucket_info": json.dumps(run.bucket_info),
        "ss_tag_frequency": json.dumps({output_name: run.tag_frequency}, ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture(prediction),
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "sdlora_adapter": spec.adapter_type,
    }
    words = trigger_words(args.caption_prefix)
    if words:
        meta["trained_words"] = json.dumps(words, ensure_ascii=False)
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    return meta


def trigger_words(prefix: str) -> list[str]:
    """The trigger words in --caption_prefix ("sks style," -> ["sks style"])."""
    return [w.strip() for w in prefix.split(",") if w.strip()]
