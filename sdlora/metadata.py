"""The training metadata written into every LoRA file's header, in kohya's (`ss_*`) and the SAI model
spec's (`modelspec.*`) vocabularies: A1111 lists a LoRA under the right base models from
`ss_base_model_version`, and shows the rest in its metadata view. Values are strings, as the
safetensors header requires."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .objectives.flow import FLOW_MATCHING


@dataclass
class RunInfo:
    """What the metadata says about the run beyond its arguments."""

    num_train_images: int  # with repeats (kohya's count)
    bucket_info: dict
    tag_frequency: dict  # {tag: count}, or {subset: {tag: count}} with several subsets
    started_at: float = field(default_factory=time.time)
    num_reg_images: int = 0
    dataset_dirs: dict = field(default_factory=dict)  # {subset: {"n_repeats", "img_count"}}
    reg_dataset_dirs: dict = field(default_factory=dict)


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
        "block_dims": ",".join(map(str, spec.block_dims)) if spec.block_dims else None,
        "block_alphas": ",".join(map(str, spec.block_alphas)) if spec.block_alphas else None,
        **lever_network_args(cfg.optimizer),
        **spec.network_args(),  # (LoHa/LoKr: LyCORIS's algo, factor, ...)
    }
    output_name = Path(cfg.outputs.output_dir).name
    width = height = settings.resolution
    captions = cfg.captions
    meta = {
        "ss_network_args": json.dumps({k: v for k, v in network_args.items() if v is not None}),
        **family.kohya_metadata(prediction, settings.denoiser_config),
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
        "ss_optimizer": optimizer_name(opt, cfg.optimizer),
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
        **lever_metadata(cfg),
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_bucket_info": json.dumps(run.bucket_info),
        "ss_tag_frequency": json.dumps(
            run.tag_frequency
            if len(run.dataset_dirs) + len(run.reg_dataset_dirs) > 1
            else {output_name: run.tag_frequency},
            ensure_ascii=False,
        ),
        "ss_num_reg_images": str(run.num_reg_images),
        "ss_dataset_dirs": json.dumps(run.dataset_dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(run.reg_dataset_dirs, ensure_ascii=False),
        "ss_prior_loss_weight": str(cfg.prior.prior_loss_weight),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "sdlora_adapter": spec.adapter_type,
    }
    if prediction == FLOW_MATCHING:
        meta.update(flow_metadata(cfg))
    words = trigger_words(captions.caption_prefix)
    if words:
        meta["trained_words"] = json.dumps(words, ensure_ascii=False)
        meta["modelspec.trigger_phrase"] = ", ".join(words)
    return meta


def lever_network_args(optimizer) -> dict:
    """kohya's ss_network_args entries for LoRA+ and block learning-rate weights (None where unset)."""

    def joined(values):
        return ",".join(map(str, values)) if values else None

    return {
        "loraplus_lr_ratio": optimizer.loraplus_lr_ratio,
        "loraplus_unet_lr_ratio": optimizer.loraplus_unet_lr_ratio,
        "loraplus_text_encoder_lr_ratio": optimizer.loraplus_text_encoder_lr_ratio,
        "down_lr_weight": joined(optimizer.down_lr_weight),
        "mid_lr_weight": optimizer.mid_lr_weight,
        "up_lr_weight": joined(optimizer.up_lr_weight),
    }


def optimizer_name(optimization, optimizer) -> str:
    """kohya's ss_optimizer: the class, with --optimizer_args in parentheses."""
    classes = {
        "AdamW": "torch.optim.AdamW",
        "AdamW8bit": "bitsandbytes.optim.AdamW8bit",
        "Lion": "bitsandbytes.optim.Lion",
        "Lion8bit": "bitsandbytes.optim.Lion8bit",
        "Adafactor": "transformers.optimization.Adafactor",
        "Prodigy": "prodigyopt.Prodigy",
        "AdamWScheduleFree": "schedulefree.AdamWScheduleFree",
        "CAME": "pytorch_optimizer.CAME",
    }
    kind = "AdamW8bit" if optimization.use_8bit_adam else optimizer.optimizer_type or "AdamW"
    args = ",".join(optimizer.optimizer_args or ())
    return classes[kind] + (f"({args})" if args else "")


def lever_metadata(cfg) -> dict[str, str]:
    """The loss, timestep, noise and EMA settings, under kohya's key names where kohya has them."""
    loss, t, noise, ema = cfg.loss, cfg.timesteps, cfg.noise, cfg.ema
    meta = {
        "ss_loss_type": loss.loss_type,
        "ss_huber_schedule": loss.huber_schedule,
        "ss_huber_c": str(loss.huber_c),
        "ss_debiased_estimation": str(loss.debiased_estimation_loss),
        "ss_scale_v_pred_loss_like_noise_pred": str(loss.scale_v_pred_loss_like_noise_pred),
        "ss_min_timestep": str(t.min_timestep or 0),
        "ss_max_timestep": str(t.max_timestep) if t.max_timestep is not None else "None",
        "ss_timestep_sampling": t.timestep_sampling,
        "ss_timestep_bias_strategy": t.timestep_bias_strategy,
        "ss_multires_noise_iterations": str(noise.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(noise.multires_noise_discount),
        "ss_ip_noise_gamma": str(noise.input_perturbation or None),
        "ss_adaptive_noise_scale": str(noise.adaptive_noise_scale),
        "ss_zero_terminal_snr": str(noise.zero_terminal_snr),
        "sdlora_ema": f"decay {ema.ema_decay}, every {ema.ema_update_interval} steps"
        if ema.use_ema
        else "None",
    }
    return meta


def flow_metadata(cfg) -> dict[str, str]:
    """A flow-matching run's noise-level settings: kohya's SD3 keys, and the shift (sdlora's own key)."""
    t, flow = cfg.timesteps, cfg.flow
    return {
        "ss_weighting_scheme": flow.weighting_scheme,
        "ss_logit_mean": str(t.logit_mean),
        "ss_logit_std": str(t.logit_std),
        "ss_mode_scale": str(flow.mode_scale),
        "sdlora_timestep_shift": str(flow.timestep_shift)
        if flow.timestep_shift is not None
        else "scheduler's",
        "sdlora_t5_max_length": str(cfg.model.t5_max_length),
    }


def trigger_words(prefix: str) -> list[str]:
    """The trigger words in --caption_prefix ("sks style," -> ["sks style"])."""
    return [w.strip() for w in prefix.split(",") if w.strip()]
