"""What a run derives from its configuration, the base model, the data and the launch, computed once into
new values (the configuration is never written to): the resolved configuration written beside the outputs,
and the settings a resume must match."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..buckets import BucketSettings, bucket_settings
from ..config.flags import flat_values, resume_values
from ..config.train import TrainConfig
from ..data import Schedule
from ..families import Family
from ..lora import AdapterSpec
from ..objectives import PREDICTION_TYPES


@dataclass(frozen=True)
class RunSettings:
    """The values a run derives: every later step reads them here, never from a changed configuration."""

    model: str  # the model folder or Hub id (the built-in tiny model resolved to its folder)
    family: Family
    resolution: int  # --resolution, or the model's native size
    prediction_type: str  # --prediction_type, or the scheduler's (flow_matching: SD 3.5)
    buckets: BucketSettings
    adapter: AdapterSpec
    mixed_precision: str  # accelerate's resolved setting
    num_processes: int
    hub_model_id: str | None = None
    schedule: Schedule | None = None  # known once the batches are planned
    denoiser_config: dict | None = None  # what the LoRA files' header says of the base (SD 3.5's variant)


def resolved_config(cfg: TrainConfig, settings: RunSettings) -> TrainConfig:
    """The configuration with every derived default filled in: written as config.toml, so `--config` on it
    re-runs the same run even where a default would resolve otherwise (another tiny-model folder, say)."""
    b, s = settings.buckets, settings.schedule
    replace = dataclasses.replace
    opt = cfg.optimization
    if s is not None:
        opt = replace(opt, max_train_steps=s.max_train_steps, num_train_epochs=s.num_train_epochs)
    return replace(
        cfg,
        model=replace(cfg.model, pretrained_model_name_or_path=settings.model),
        adapter=replace(cfg.adapter, lora_alpha=settings.adapter.alpha),
        # (a flow-matching model's prediction type is its family's, not a --prediction_type choice)
        objective=replace(cfg.objective, prediction_type=settings.prediction_type)
        if settings.prediction_type in PREDICTION_TYPES
        else cfg.objective,
        data=replace(cfg.data, resolution=settings.resolution),
        buckets=replace(
            cfg.buckets, bucket_reso_steps=b.step, min_bucket_reso=b.min_reso, max_bucket_reso=b.max_reso
        ),
        speed=replace(cfg.speed, mixed_precision=settings.mixed_precision),
        optimization=opt,
        outputs=replace(cfg.outputs, hub_model_id=settings.hub_model_id),
    )


def resume_settings(
    resolved: TrainConfig, dataset: str, examples: int, captions: str, num_processes: int, subsets=None
) -> dict:
    """The settings a resumed run must share with its checkpoint: every flag marked resume=True (resolved),
    and what was derived from the data and the launch. 07cb97d's checkpoints recorded some of these under
    other names (base_model, lora_layers with explicit targets, crop_mode...), kept so they still compare."""
    values = resume_values(resolved)
    adapter = resolved.adapter
    values.update(
        base_model=resolved.model.pretrained_model_name_or_path,
        adapter=AdapterSpec.from_config(adapter).adapter_type,
        lora_layers=list(adapter.lora_target_modules) if adapter.lora_target_modules else adapter.lora_layers,
        crop_mode=resolved.buckets.crop_mode,
        dataset=dataset,
        examples=examples,
        captions=captions,
        num_processes=num_processes,
    )
    if subsets is not None:  # (data.pictures.TrainImages.layout: repeats, roles, captions, masks, limits)
        values["subsets"] = subsets
    return values


def args_json(resolved: TrainConfig) -> dict:
    """args.json: every resolved flag value (and the crop mode), no secret; data only."""
    values = flat_values(resolved)
    values["crop_mode"] = resolved.buckets.crop_mode
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(values.items())}


def derive_settings(cfg, base, accelerator, hub_model_id: str | None) -> RunSettings:
    """What the run derives from its flags and the model: resolution, prediction type, buckets, adapter."""
    resolution = cfg.data.resolution or base.family.native_resolution(base.name, cfg.model.revision)
    b = cfg.buckets
    buckets = bucket_settings(
        b.crop_mode,
        resolution,
        base.family.size_multiple(base.name, cfg.model.revision),
        b.bucket_reso_steps,
        b.min_bucket_reso,
        b.max_bucket_reso,
        b.bucket_no_upscale,
    )
    return RunSettings(
        base.name,
        base.family,
        resolution,
        base.family.prediction_type(base.noise_scheduler, cfg.objective.prediction_type),
        buckets,
        AdapterSpec.from_config(cfg.adapter),
        accelerator.mixed_precision,
        accelerator.num_processes,
        hub_model_id,
        denoiser_config=dict(base.denoiser.config),
    )
