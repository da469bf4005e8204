"""The training step's pieces: the LoRA learns, noise is a pure function of the step, min-SNR and v-prediction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from sdlora.errors import UserError
from sdlora.lora import add_lora, lora_parameters
from sdlora.training import diffusion_loss, step_generator, weight_dtype_for


@pytest.fixture
def unet(tiny_model):
    model = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    model.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=4)
    return model


def _loss(unet, scheduler, args, latents, text, step):
    return diffusion_loss(
        unet, latents, text, scheduler, args, step_generator(0, step, 0, 0, torch.device("cpu"))
    )


def test_loss_at_fixed_noise_and_timesteps_falls(unet, tiny_model):
    scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    args = SimpleNamespace(noise_offset=0.0, snr_gamma=None)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-2)
    with torch.no_grad():
        before = _loss(unet, scheduler, args, latents, text, step=1).item()
    for _ in range(40):
        loss = _loss(unet, scheduler, args, latents, text, step=1)  # same noise and timesteps every time
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = _loss(unet, scheduler, args, latents, text, step=1).item()
    assert after < 0.7 * before, (before, after)


def test_step_generator_is_a_pure_function_of_its_inputs():
    draw = lambda *k: torch.randn(4, generator=step_generator(*k, torch.device("cpu")))  # noqa: E731
    assert torch.equal(draw(1, 5, 0, 0), draw(1, 5, 0, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 6, 0, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 5, 1, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 5, 0, 1))


def test_min_snr_and_v_prediction_give_finite_different_losses(unet, tiny_model):
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    losses = []
    # gamma 1e-4 is below every timestep's SNR, so the min-SNR weights differ from 1 whatever timesteps are drawn
    for prediction_type, gamma in (
        ("epsilon", None),
        ("epsilon", 1e-4),
        ("v_prediction", None),
        ("v_prediction", 1e-4),
    ):
        scheduler = DDPMScheduler.from_pretrained(
            tiny_model, subfolder="scheduler", prediction_type=prediction_type
        )
        with torch.no_grad():
            losses.append(
                _loss(
                    unet, scheduler, SimpleNamespace(noise_offset=0.1, snr_gamma=gamma), latents, text, 3
                ).item()
            )
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 4


def test_fp16_is_refused_on_cpu_only():
    with pytest.raises(UserError, match="bf16 or no"):
        weight_dtype_for("fp16", torch.device("cpu"))
    assert weight_dtype_for("fp16", torch.device("cuda")) == torch.float16
    assert weight_dtype_for("bf16", torch.device("cpu")) == torch.bfloat16
    assert weight_dtype_for("no", torch.device("cpu")) == torch.float32


def test_attention_takes_pytorch_sdpa_path(unet):
    # AttnProcessor2_0 is diffusers' processor that calls F.scaled_dot_product_attention.
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
