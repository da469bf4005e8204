"""The pieces of a LoRA training step: precision, optimizer, schedule, noise and the diffusion loss."""

from __future__ import annotations

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
