"""The trainer's configuration: one frozen section per concern, each field a flag (the diffusers example's
names first, kohya's where diffusers has none), and the checks that run once on the whole.

Fields marked `resume=True` shape the data, the objective, the adapter or the optimizer: a resumed run
must use the same values (sdlora.checkpoints compares them, with the values derived from the model and
the data), so a new flag that shapes training is covered by marking it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flags import flag
from .flow import FlowMatchingConfig
from .levers import EMAConfig, LossConfig, NoiseConfig, OptimizerConfig, TimestepConfig
from .subject import MaskConfig, PriorConfig

LAYER_SETS = ("attn", "attn_ff", "all")
NETWORK_TYPES = ("lora", "loha", "lokr")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class ModelConfig:
    """model: the base model and where it comes from"""

    pretrained_model_name_or_path: str | None = flag(
        None, "Hub id or local diffusers folder (default: built-in tiny model)"
    )
    pretrained_vae_model_name_or_path: str | None = flag(
        None,
        "another VAE (folder or Hub id), e.g. SDXL's fp16-fixed VAE; default: the model's own",
        resume=True,
    )
    revision: str | None = flag(None, "model revision on the Hub")
    variant: str | None = flag(None, "weights variant, e.g. fp16")
    t5_max_length: int = flag(
        77, "SD 3.5: T5 tokens per caption (the diffusers SD3 script's 77)", resume=True
    )


@dataclass(frozen=True)
class AdapterConfig:
    """adapter: what is trained (LoRA, LoCon, DoRA, LoHa, LoKr) and where"""

    rank: int = flag(4, "LoRA rank", resume=True)
    lora_alpha: float | None = flag(
        None, "LoRA alpha (scale = alpha / rank); default: equal to --rank", resume=True
    )
    lora_layers: str = flag(
        "attn",
        "attn: the UNet's attention projections (the diffusers example's); attn_ff: every Linear and 1x1 "
        "conv of the transformer blocks (kohya's default); all: plus the ResNet and sampler convs (LoCon)",
        choices=LAYER_SETS,
        resume=True,
    )
    lora_target_modules: tuple[str, ...] | None = flag(
        None, "explicit UNet module names (or name suffixes) to adapt, instead of --lora_layers", resume=True
    )
    conv_rank: int | None = flag(
        None,
        "rank of the 3x3 convs with --lora_layers all (default: --rank)",
        aliases=("conv_dim",),
        resume=True,
    )
    conv_alpha: float | None = flag(None, "alpha of the 3x3 convs (default: --conv_rank)", resume=True)
    use_dora: bool = flag(False, "weight-decomposed LoRA (DoRA, peft's use_dora)", resume=True)
    lora_dropout: float = flag(0.0, "dropout on the LoRA path", resume=True)
    block_dims: tuple[int, ...] | None = flag(
        None,
        "kohya's per-block LoRA ranks: the down blocks, the middle one(s), the up blocks (0: none there)",
        resume=True,
    )
    block_alphas: tuple[float, ...] | None = flag(
        None, "per-block LoRA alphas, in --block_dims' order", resume=True
    )
    train_text_encoder: bool = flag(
        False, "also train LoRA on the text encoder(s) (turns the text-embedding cache off)", resume=True
    )
    network_type: str = flag(
        "lora",
        "lora; loha or lokr: LyCORIS's Hadamard / Kronecker-product adapters (peft's), saved in LyCORIS's "
        "format (A1111, ComfyUI and kohya read it); they take --rank, --lora_alpha, --conv_rank, --conv_alpha",
        choices=NETWORK_TYPES,
        resume=True,
    )
    lokr_factor: int = flag(
        -1,
        "LoKr: size of the Kronecker product's small factor (LyCORIS's factor; -1: automatic)",
        resume=True,
    )
    decompose_both: bool = flag(False, "LoKr: also decompose the small factor (LyCORIS's)", resume=True)
    use_tucker: bool = flag(
        False,
        "LoHa/LoKr: Tucker-decompose the 3x3 convs (LyCORIS's; peft's use_effective_conv2d)",
        resume=True,
    )
    rank_dropout: float = flag(
        0.0, "LoHa/LoKr: drop each output row of the update with this chance", resume=True
    )
    module_dropout: float = flag(0.0, "LoHa/LoKr: skip each module's update with this chance", resume=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """objective: what the denoiser is trained to predict, and how the loss is weighted"""

    prediction_type: str | None = flag(
        None, "override the scheduler's prediction type", choices=("epsilon", "v_prediction"), resume=True
    )
    snr_gamma: float | None = flag(None, "min-SNR weighting gamma (5.0 recommended)", resume=True)
    noise_offset: float = flag(0.0, "offset-noise strength", resume=True)


@dataclass(frozen=True)
class DataConfig:
    """data: the training images and captions"""

    dataset_from_disk: bool = flag(
        False, "load a dataset saved by create_dataset.py from --dataset_disk_path"
    )
    dataset_disk_path: str = flag("datasets/Text2Image_example", "folder written by create_dataset.py")
    train_data_dir: str | None = flag(None, "imagefolder with images and metadata.jsonl")
    dataset_name: str | None = flag(None, "dataset on the Hugging Face Hub")
    dataset_config_name: str | None = flag(None, "config of the Hub dataset")
    cache_dir: str | None = flag(None, "where downloaded models and datasets are stored")
    image_column: str = flag("image", "dataset column holding the images", resume=True)
    caption_column: str = flag("text", "dataset column holding the captions", resume=True)
    max_train_samples: int | None = flag(None, "use only the first N examples")
    skip_invalid: bool = flag(
        False, "train on the usable images, listing the others (unreadable, or without a caption)"
    )
    resolution: int | None = flag(None, "training resolution (default: the model's native size)", resume=True)
    random_flip: bool = flag(False, "flip images horizontally at random", resume=True)
    image_interpolation_mode: str = flag(
        "lanczos",
        "resampling filter for resizing",
        choices=("lanczos", "bilinear", "bicubic", "nearest"),
        resume=True,
    )
    background: str = flag("white", "colour transparent images are composited on", resume=True)
    dataloader_num_workers: int = flag(0, "data loading worker processes")


@dataclass(frozen=True)
class BucketConfig:
    """buckets: how each image becomes a training picture (kohya's names)"""

    enable_bucket: bool = flag(
        False,
        "aspect-ratio buckets (the default unless --center_crop or --random_crop; accepted for kohya's command lines)",
    )
    center_crop: bool = flag(False, "square center crops instead of buckets", resume=True)
    random_crop: bool = flag(
        False,
        "square random crops instead of buckets (the diffusers example's default; cannot cache latents)",
        resume=True,
    )
    bucket_reso_steps: int | None = flag(
        None,
        "bucket sides are multiples of this (default: 64, or the model's minimum for small models)",
        resume=True,
    )
    min_bucket_reso: int | None = flag(
        None, "smallest bucket side, a multiple of --bucket_reso_steps (default: resolution / 2)", resume=True
    )
    max_bucket_reso: int | None = flag(
        None, "largest bucket side, a multiple of --bucket_reso_steps (default: resolution x 2)", resume=True
    )
    bucket_no_upscale: bool = flag(False, "never enlarge small images: bucket at their own size", resume=True)

    @property
    def crop_mode(self) -> str:
        return "center" if self.center_crop else "random" if self.random_crop else "bucket"


@dataclass(frozen=True)
class CaptionConfig:
    """captions: trigger words, dropout and tag shuffling (kohya's names)"""

    caption_prefix: str = flag("", "text put before every caption, e.g. a trigger word", resume=True)
    caption_suffix: str = flag("", "text put after every caption", resume=True)
    caption_dropout_rate: float = flag(0.0, "fraction of examples trained with an empty caption", resume=True)
    shuffle_caption: bool = flag(False, "shuffle the tags of each caption every epoch", resume=True)
    keep_tokens: int = flag(0, "with --shuffle_caption: the first N tags stay in place", resume=True)
    caption_separator: str = flag(",", "what separates tags in a caption", resume=True)
    caption_tag_dropout_rate: float = flag(
        0.0, "drop each tag (after --keep_tokens) with this chance", resume=True
    )


@dataclass(frozen=True)
class CacheConfig:
    """caches: encode each image and caption once"""

    cache_latents: bool | None = flag(
        None, "encode each image with the VAE once (default: on unless random crops make it invalid)"
    )
    cache_latents_to_disk: bool = flag(False, "keep the latent cache on disk for later runs")
    cache_text_embeddings: bool = flag(True, "encode each caption with the frozen text encoder once")
    latents_cache_dir: str | None = flag(None, "folder for on-disk caches (default: <output_dir>/cache)")
    cache_memory_limit_gb: float = flag(
        2.0, "a latent cache larger than this lives on disk (in --latents_cache_dir), read on demand"
    )
    cache_batch_size: int = flag(8, "batch size while filling the caches")


@dataclass(frozen=True)
class SpeedConfig:
    """speed and precision"""

    mixed_precision: str | None = flag(
        None, "override accelerate's mixed-precision setting", choices=("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = flag(
        False, "trade compute for memory in the UNet (and trained text encoders)"
    )
    allow_tf32: bool = flag(False, "allow TF32 matmuls on Ampere and newer GPUs")
    torch_compile: bool = flag(False, "compile the UNet with torch.compile")
    torch_compile_backend: str = flag("inductor", "torch.compile backend (inductor; aot_eager to debug)")
    channels_last: bool = flag(False, "UNet in channels_last memory format")
    enable_xformers_memory_efficient_attention: bool = flag(
        False, "use xformers attention (PyTorch's SDPA is used otherwise)"
    )


@dataclass(frozen=True)
class OptimizationConfig:
    """optimisation: steps, batches, learning rates and the optimizer"""

    seed: int = flag(0, "seed for weights, data order, augmentation and noise", resume=True)
    train_batch_size: int = flag(16, "batch size per device", resume=True)
    num_train_epochs: int = flag(100, "epochs (ignored when --max_train_steps is set)")
    max_train_steps: int | None = flag(None, "total optimizer steps")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step", resume=True)
    learning_rate: float = flag(1e-4, "peak learning rate", resume=True)
    unet_lr: float | None = flag(
        None, "learning rate of the UNet LoRA (default: --learning_rate)", resume=True
    )
    text_encoder_lr: float | None = flag(
        None, "learning rate of the text-encoder LoRA (default: --learning_rate)", resume=True
    )
    scale_lr: bool = flag(
        False, "multiply the learning rate by batch size, accumulation and processes", resume=True
    )
    lr_scheduler: str = flag("constant", "learning-rate schedule", choices=LR_SCHEDULERS, resume=True)
    lr_warmup_steps: int = flag(500, "warm-up steps", resume=True)
    use_8bit_adam: bool = flag(False, "bitsandbytes' 8-bit AdamW", resume=True)
    adam_beta1: float = flag(0.9, "AdamW beta1", resume=True)
    adam_beta2: float = flag(0.999, "AdamW beta2", resume=True)
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay", resume=True)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", resume=True)
    max_grad_norm: float = flag(1.0, "gradient clipping norm", resume=True)


@dataclass(frozen=True)
class ValidationConfig:
    """validation images"""

    validation_prompt: str | None = flag(
        None,
        "a single validation prompt (kohya's options too: --n negative --w --h --d seed --l cfg --s steps)",
    )
    validation_prompts_dir: str | None = flag(
        None,
        "prompts file: one per line with kohya's options, or JSON / TOML (kohya's sample-prompt formats)",
    )
    validation_negative_prompts_dir: str | None = flag(None, "file with one negative prompt per line")
    num_validation_images: int = flag(4, "images per prompt")
    validation_epochs: int = flag(1, "validate every N epochs")
    validation_steps: int | None = flag(None, "validate every N steps instead")
    validation_num_inference_steps: int = flag(30, "denoising steps for validation")
    validation_guidance_scale: float = flag(7.5, "guidance scale for validation")
    validation_width: int | None = flag(None, "validation image width (default: native size)")
    validation_height: int | None = flag(None, "validation image height (default: native size)")


@dataclass(frozen=True)
class HeldoutConfig:
    """held-out loss and early stopping"""

    validation_split: str | None = flag(
        None,
        "hold images out of training for a held-out loss: a fraction (0.1) or a count (8), chosen from the seed",
        resume=True,
    )
    validation_data_dir: str | None = flag(
        None, "a separate held-out set: an imagefolder with metadata.jsonl"
    )
    validation_dataset_disk_path: str | None = flag(
        None, "a separate held-out set saved by create_dataset.py"
    )
    validation_loss_timesteps: int = flag(8, "fixed timesteps each held-out image is scored at")
    validation_loss_steps: int | None = flag(
        None, "compute the held-out loss every N steps (default: with the validation images, and at the end)"
    )
    early_stopping_patience: int | None = flag(
        None, "stop after N held-out evaluations without improvement (needs a held-out set)"
    )
    early_stopping_min_delta: float = flag(0.0, "smaller improvements do not count")

    @property
    def enabled(self) -> bool:
        return bool(self.validation_split or self.validation_data_dir or self.validation_dataset_disk_path)


@dataclass(frozen=True)
class CheckpointConfig:
    """checkpoints and resuming"""

    checkpointing_steps: int = flag(500, "save a checkpoint every N steps")
    checkpoints_total_limit: int | None = flag(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = flag(None, "'latest' or a checkpoint-<step> folder", per_run=True)
    overwrite_output_dir: bool = flag(
        False,
        "a new run into --output_dir replaces what an earlier run left there (once it has saved something)",
        per_run=True,
    )
    force_resume: bool = flag(False, "resume even if settings differ from the checkpoint's", per_run=True)


@dataclass(frozen=True)
class OutputConfig:
    """outputs"""

    output_dir: str = flag("sd-model-finetuned-lora", "where weights, checkpoints and logs go", per_run=True)
    logging_dir: str = flag("logs", "TensorBoard folder, relative to --output_dir")
    report_to: str = flag("tensorboard", "tensorboard, wandb, all or none")
    logging_steps: int = flag(10, "read the loss every N steps (reading it waits for the GPU)")
    push_to_hub: bool = flag(False, "upload the output folder to the Hub")
    hub_model_id: str | None = flag(
        None, "Hub repository for --push_to_hub (default: the output folder's name)"
    )
    hub_token: str | None = flag(None, "Hub token for --push_to_hub", secret=True)
    local_rank: int = flag(-1, "set by launchers; accelerate reads LOCAL_RANK", per_run=True)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is given, in one read-only object."""

    model: ModelConfig
    adapter: AdapterConfig
    objective: ObjectiveConfig
    loss: LossConfig
    timesteps: TimestepConfig
    noise: NoiseConfig
    flow: FlowMatchingConfig
    data: DataConfig
    prior: PriorConfig
    masks: MaskConfig
    buckets: BucketConfig
    captions: CaptionConfig
    cache: CacheConfig
    speed: SpeedConfig
    optimization: OptimizationConfig
    optimizer: OptimizerConfig
    ema: EMAConfig
    validation: ValidationConfig
    heldout: HeldoutConfig
    checkpoints: CheckpointConfig
    outputs: OutputConfig
