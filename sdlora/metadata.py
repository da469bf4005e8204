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

    num_train_images: int
    bucket_info: dict
    tag_frequency: dict[str, int]
    started_at: float = field(default_factory=time.time)


def lora_metadata(cfg, settings, run: RunInfo, step: int, epoch: int) -> dict[str, str]:
    """Every header key for the LoRA as of `step` (a checkpoint's or the final one's) and the epoch it is in
    (1-based). cfg: config.train.TrainConfig; settings: training.settings.RunSettings."""
    family, prediction, spec = settings.family, settings.prediction_type, settings.adapter
    schedule, buckets, opt = settings.schedule, settings.buckets, cfg.optimization
    locon = spec.layers == "all"
    network_args = {
        "lora_layers": spec.layers,
        "conv_dim": str(spec.conv_rank or spec.rank) if locon else None,
        "conv_alpha": str(
            spec.conv_alpha if spec.conv_alpha is not None else float(spec.conv_rank or spec.rank)
        )
        if locon
        else None,
        "dora_wd": "True" if spec.use_dora else None,
        "dropout": str(spec.dropout) if spec.dropout else None,
        "target_modules": list(spec.target_modules) if spec.target_modules else None,
    }
    output_name = Path(cfg.outputs.output_dir).name
    width = height = settings.resolution
    captions = cfg.captions
    meta = {
        "ss_network_args": json.dumps({k: v for k, v in network_args.items() if v is not None}),
        **family.kohya_metadata(prediction),
        "ss_v_parameterization": str(prediction == "v_prediction"),
        "ss_sd_model_name": settings.model,
        "ss_output_name": output_name,
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": str(run.num_train_images),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_max_train_steps": str(schedule.max_train_steps),
        "ss_learning_rate": str(schedule.learning_rate),
        "ss_unet_lr": str(schedule.unet_lr),
        "ss_text_encoder_lr": str(schedule.text_encoder_lr) if spec.text_encoder else "0",
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": str(opt.lr_warmup_steps),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if opt.use_8bit_adam else "torch.optim.AdamW",
        "ss_max_grad_norm": str(opt.max_grad_norm),
        "ss_batch_size_per_device": str(opt.train_batch_size),
        "ss_gradient_accumulation_steps": str(opt.gradient_accumulation_steps),
        "ss_mixed_precision": str(settings.mixed_precision),
        "ss_seed": str(opt.seed),
        "ss_enable_bucket": str(buckets.mode == "bucket"),
        "ss_bucket_no_upscale": str(buckets.no_upscale),
        "ss_min_bucket_reso": str(buckets.min_reso),
        "ss_max_bucket_reso": str(buckets.max_reso),
        "ss_flip_aug": str(cfg.data.random_flip),
        "ss_caption_dropout_rate": str(captions.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(captions.caption_tag_dropout_rate),
        "ss_shuffle_caption": str(captions.shuffle_caption),
        "ss_keep_tokens": str(captions.keep_tokens),
        "ss_noise_offset": str(cfg.objective.noise_offset),
        "ss_min_snr_gamma": str(cfg.objective.snr_gamma),
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_bucket_info": json.dumps(run.bucket_info),
        "ss_tag_frequency": json.dumps({output_name: run.tag_frequency}, ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "sdlora_adapter": spec.adapter_type,
    }
    words = trigger_words(captions.caption_prefix)
    if words:
        meta["trained_words"] = json.dumps(words, ensure_ascii=False)
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    return meta


def trigger_words(prefix: str) -> list[str]:
    """The trigger words in --caption_prefix ("sks style," -> ["sks style"])."""
    return [w.strip() for w in prefix.split(",") if w.strip()]
