"""The pieces of a LoRA training step: precision, optimizer, schedule, noise, conditioning and the loss."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import scale_latents
from .errors import UserError
from .families import time_ids


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen weights, from accelerate's resolved mixed-precision setting.

    accelerate's setting is the one source of truth, so `accelerate launch --mixed_precision fp16`
    alone is enough; LoRA weights and optimizer state stay fp32 whatever this returns.
    """
    if mixed_precision == "fp16":
        if device.type == "cpu":
            raise UserError("fp16 mixed precision does not run on a CPU; use --mixed_precision bf16 or no")
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def check_8bit_adam() -> None:
    """Fail before any model loads if bitsandbytes' 8-bit AdamW cannot be used."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.optim import AdamW8bit  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA setup error raised at import
        raise UserError(
            f"--use_8bit_adam needs bitsandbytes, which cannot be used here ({type(e).__name__}: {e}); "
            "run `pip install bitsandbytes` or drop --use_8bit_adam"
        ) from None


def make_optimizer(param_groups: list[dict], args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights (one group per learning rate): bitsandbytes' 8-bit version, or torch's
    (fused on CUDA)."""
    kwargs = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    # The fused CUDA kernel does the update for all tensors at once; on CPU the foreach path is the fast one.
    return torch.optim.AdamW(
        param_groups, **kwargs, **({"fused": True} if device.type == "cuda" else {"foreach": True})
    )


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=total_steps,
    )


def step_seed(seed: int, step: int, micro: int, rank: int, stream: int = 0) -> int:
    """A seed that is a pure function of (seed, step, micro-batch, process, stream)."""
    return int(
        np.random.SeedSequence([seed, step, micro, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, micro-batch, process),
    so a resumed run draws exactly the noise and timesteps an uninterrupted run would."""
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return generator.manual_seed(step_seed(seed, step, micro, rank))


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def noised(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler):
    """(noisy latents, training target) in fp32 whatever the weights' dtype: in bf16, alphas_cumprod near 1
    rounds to 1 and the smallest timesteps would get no noise at all."""
    latents, noise = latents.float(), noise.float()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noisy, noise
    if prediction_type == "v_prediction":
        return noisy, noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(
        f"unsupported prediction type {prediction_type!r}; use --prediction_type epsilon or v_prediction"
    )


def diffusion_loss(
    unet, latents, unet_inputs: dict, noise_scheduler, args, generator, dtype=torch.float32
) -> torch.Tensor:
    """Noise the latents at random timesteps and score the UNet's prediction (epsilon or v)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    if args.noise_offset:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise: lets the model learn very dark/bright images
        offset = torch.randn(
            (b, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=torch.float32
        )
        noise = noise + args.noise_offset * offset
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=latents.device
    )
    noisy, target = noised(latents, noise, timesteps, noise_scheduler)
    pred = unet(noisy.to(dtype), timesteps, **unet_inputs, return_dict=False)[0]
    return weighted_mse(pred, target, timesteps, noise_scheduler, args.snr_gamma)


def weighted_mse(pred, target, timesteps, noise_scheduler, snr_gamma: float | None) -> torch.Tensor:
    """Mean squared error, with min-SNR weighting when snr_gamma is set."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (section 3.4): min(SNR, gamma) / SNR for epsilon,
    # divided by SNR + 1 instead for v-prediction.
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = (
        weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    )
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


class Conditioning:
    """Latents and UNet conditioning for a batch: looked up in the caches, or computed by the frozen
    encoders on every step (the plain path the diffusers example takes)."""

    def __init__(self, base, images, latent_cache, text_cache, text_encoders, device, dtype):
        self.base, self.images = base, images
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.text_encoders = text_encoders  # as prepared by accelerate when they are trained
        self.device, self.dtype = device, dtype

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """fp32 scaled latents (B, 4, H/8, W/8)."""
        if self.latent_cache is not None:
            return self.latent_cache.sample(batch["index"], batch["flip"], generator, self.device)
        vae = self.base.vae
        pixels = batch["pixel_values"].to(self.device, self.base.vae_dtype or self.dtype, non_blocking=True)
        with torch.no_grad():
            sample = vae.encode(pixels).latent_dist.sample(generator)  # (B, 4, H/8, W/8)
        return scale_latents(
            sample, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
        ).float()

    def text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_cache is not None:
            return self.text_cache.lookup(captions, self.device, self.dtype)
        trained = any(p.requires_grad for e in self.text_encoders for p in e.parameters())
        with torch.enable_grad() if trained else torch.no_grad():
            return self.base.family.encode_prompts(
                self.base.tokenizers, self.text_encoders, captions, self.device
            )

    def time_ids(self, batch: dict) -> torch.Tensor | None:
        """SDXL's size and crop conditioning of each example, from its recorded placement."""
        if not self.base.family.uses_time_ids:
            return None
        rows = []
        for index, flip, crop in zip(batch["index"].tolist(), batch["flip"].tolist(), batch["crop"]):
            placement = self.images.placements[index]
            rows.append(time_ids(placement.original, placement.crop_for(flip, crop), placement.bucket))
        return torch.tensor(rows, device=self.device, dtype=self.dtype)  # (B, 6)

    def unet_inputs(self, batch: dict) -> dict:
        return self.base.family.unet_inputs(self.text(batch["caption"]), self.time_ids(batch))


def refuse_sharded_training() -> None:
    """DeepSpeed and FSDP are refused before anything loads: the loop steps its own optimizer over
    gradient accumulation, which they would take over, and a LoRA on SD fits on one GPU anyway."""
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise UserError(
                f"{name} is not supported ({var} is set by your accelerate config or launch flags): a LoRA "
                "fits on one GPU; scale out with DDP instead (accelerate launch --multi_gpu --num_processes N)"
            )


def make_accelerator(args):
    """The Accelerator, logging, and the checks that must fail before any model is loaded.

    Returns (accelerator, dtype of the frozen weights).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

    from .images import parse_color

    refuse_sharded_training()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        # SDXL conditions on the first text encoder's penultimate layer: the LoRA of its last layer gets no
        # gradient, which DDP must be told to expect (a small cost per step, only with --train_text_encoder).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)],
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started > 1 and accelerator.num_processes == 1:
        raise UserError(
            f"{started} processes were started but each would train alone (no GPU for --multi_gpu): on CPUs, "
            "set ACCELERATE_USE_CPU=1 (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N)"
        )
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UserError(
            f"{accelerator.distributed_type.value} is not supported: a LoRA fits on one GPU; scale out with DDP "
            "instead (accelerate launch --multi_gpu --num_processes N)"
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    weight_dtype = weight_dtype_for(accelerator.mixed_precision, accelerator.device)
    args.mixed_precision = accelerator.mixed_precision  # recorded in args.json and the model card
    if args.use_8bit_adam:
        check_8bit_adam()
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise UserError(
                "--enable_xformers_memory_efficient_attention: xformers is not installed; drop the flag (PyTorch's SDPA is used)"
            ) from None
    if args.allow_tf32:
        allow_fast_fp32_math(accelerator.device)
    args.background_rgb = parse_color(args.background)
    return accelerator, weight_dtype


def allow_fast_fp32_math(device: torch.device) -> None:
    """Let fp32 convolutions and matmuls use faster reduced-precision math (fp32 accumulation):
    TF32 on Ampere and newer GPUs; on CPUs with AMX or AVX512-BF16, oneDNN's bf16 math mode.
    Measured on a 2-core AMX Xeon: a 320-channel 3x3 conv forward+backward 49 -> 29 ms, a 4096x1280x1280
    matmul 39 -> 16 ms (bench/bench_training.py has whole-step numbers).

    Only PyTorch's newer precision API is used, and matmuls through set_float32_matmul_precision, which
    keeps every backend consistent: mixing it with the legacy `allow_tf32` flags makes
    torch.get_float32_matmul_precision() raise, and inductor calls it.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("medium")  # oneDNN bf16 on CPUs that have it
        torch.backends.mkldnn.conv.fp32_precision = "bf16"


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits.
    A second signal is not caught: a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)  # the second one ends the process at once

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree(accelerator, stop: bool, bad_step: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """The stop request and first non-finite step, agreed by every process (one small all-reduce), so that
    all of them leave the loop at the same step instead of some waiting forever in a collective."""
    if accelerator.num_processes == 1:
        return stop, bad_step
    import torch.distributed as dist

    flags = torch.stack([torch.tensor(float(stop), device=bad_step.device), bad_step.float()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), flags[1].long()


def check_finite(bad_step: torch.Tensor, last_checkpoint) -> None:
    """Stop the run, naming the step, if any step's loss was NaN or infinite (reading it waits for the GPU)."""
    step = int(bad_step.item())
    if step >= 0:
        where = (
            f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        )
        raise UserError(
            f"loss became NaN or infinite at step {step}; nothing more was saved ({where}); "
            "lower --learning_rate or use --mixed_precision bf16/no"
        )


def make_optimization(args, accelerator, models: dict[str, torch.nn.Module]):
    """Optimizer and schedule over the LoRA weights (--unet_lr and --text_encoder_lr, both defaulting to
    --learning_rate); the adapted models and optimizer prepared by accelerate.

    Returns (prepared models by name, optimizer, schedule). The schedule is not prepared: accelerate
    would step it once per process, and it is stepped here exactly once per optimizer step.
    """
    from .lora import lora_parameters

    groups = []
    for name, model in models.items():
        lr = args.unet_lr if name == "unet" else args.text_encoder_lr
        groups.append({"params": lora_parameters(model), "lr": lr if lr is not None else args.learning_rate})
    optimizer = make_optimizer(groups, args, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, args, args.max_train_steps)
    prepared = accelerator.prepare(*models.values(), optimizer)
    *modules, optimizer = prepared
    prepared_models = dict(zip(models, modules))
    if args.torch_compile:
        prepared_models["unet"] = torch.compile(prepared_models["unet"], backend=args.torch_compile_backend)
    return prepared_models, optimizer, lr_scheduler
