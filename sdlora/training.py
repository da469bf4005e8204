"""The pieces of a LoRA training step: precision, optimizer, schedule, noise and the diffusion loss."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError


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


def make_optimizer(params: list[torch.nn.Parameter], args, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the LoRA weights: bitsandbytes' 8-bit version, or torch's (fused on CUDA)."""
    kwargs = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused CUDA kernel does the update for all tensors at once; on CPU the foreach path is the fast one.
    return torch.optim.AdamW(
        params, **kwargs, **({"fused": True} if device.type == "cuda" else {"foreach": True})
    )


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=total_steps,
    )


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The random stream of one micro-batch: a pure function of (seed, step, micro-batch, process),
    so a resumed run draws exactly the noise and timesteps an uninterrupted run would."""
    state = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return generator.manual_seed(state)


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(unet, latents, encoder_hidden_states, noise_scheduler, args, generator) -> torch.Tensor:
    """Noise the latents at random timesteps and score the UNet's prediction (epsilon or v)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if args.noise_offset:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise: lets the model learn very dark/bright images
        offset = torch.randn(
            (b, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + args.noise_offset * offset
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(
            f"unsupported prediction type {noise_scheduler.config.prediction_type!r}; use --prediction_type epsilon or v_prediction"
        )
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    if args.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    # Min-SNR weighting, https://arxiv.org/abs/2303.09556 (section 3.4): min(SNR, gamma) / SNR for epsilon,
    # divided by SNR + 1 instead for v-prediction.
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=args.snr_gamma)
    weights = (
        weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    )
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """CLIP hidden states (B, 77, D); captions longer than the encoder's 77 tokens are truncated."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids, return_dict=False)[0]


class Conditioning:
    """Latents and text embeddings for a batch: looked up in the caches, or computed by the frozen
    encoders on every step (the plain path the diffusers example takes)."""

    def __init__(self, base, captions: list[str], latent_cache, text_cache, device, dtype):
        self.base, self.captions = base, captions
        self.latent_cache, self.text_cache = latent_cache, text_cache
        self.device, self.dtype = device, dtype

    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.sample(batch["index"], batch["flip"], generator, self.device).to(
                self.dtype
            )
        pixels = batch["pixel_values"].to(self.device, self.dtype, non_blocking=True)  # (B, 3, H, W)
        with torch.no_grad():
            dist = self.base.vae.encode(pixels).latent_dist
            return dist.sample(generator) * self.base.vae.config.scaling_factor  # (B, 4, H/8, W/8)

    def text(self, batch: dict) -> torch.Tensor:
        if self.text_cache is not None:
            return self.text_cache.lookup(batch["index"], self.device, self.dtype)
        with torch.no_grad():
            prompts = [self.captions[i] for i in batch["index"].tolist()]
            return encode_prompts(self.base.tokenizer, self.base.text_encoder, prompts, self.device)


def make_accelerator(args):
    """The Accelerator, logging, and the checks that must fail before any model is loaded.

    Returns (accelerator, dtype of the frozen weights).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .images import parse_color

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
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
        allow_fast_fp32_math()
    args.background_rgb = parse_color(args.background)
    return accelerator, weight_dtype


def allow_fast_fp32_math() -> None:
    """Let fp32 convolutions and matmuls use faster reduced-precision math (fp32 accumulation):
    TF32 on Ampere and newer GPUs; on CPUs with AMX or AVX512-BF16, oneDNN's bf16 math mode.
    Measured on a 2-core AMX Xeon: a 320-channel 3x3 conv forward+backward 49 -> 29 ms, a 4096x1280x1280
    matmul 39 -> 16 ms (bench/bench_training.py has whole-step numbers)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mkldnn = torch.backends.mkldnn
    if hasattr(mkldnn, "conv") and hasattr(
        mkldnn.conv, "fp32_precision"
    ):  # PyTorch 2.9+; ignored without bf16 units
        mkldnn.conv.fp32_precision = "bf16"
        mkldnn.matmul.fp32_precision = "bf16"


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


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


def make_optimization(args, accelerator, unet):
    """Optimizer and schedule over the LoRA weights; the UNet and optimizer prepared by accelerate.

    The schedule is not prepared: accelerate would step it once per process, and it is stepped
    here exactly once per optimizer step.
    """
    from .lora import lora_parameters

    optimizer = make_optimizer(lora_parameters(unet), args, accelerator.device)
    lr_scheduler = make_lr_scheduler(optimizer, args, args.max_train_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if args.torch_compile:
        unet = torch.compile(unet)
    return unet, optimizer, lr_scheduler
