"""The training step's pieces: the LoRA learns, noise is a pure function of the step, min-SNR against the
paper's formula, fp32 noise under bf16 weights, v-prediction, and precision settings that stay usable."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from sdlora.errors import UserError
from sdlora.lora import add_lora, lora_parameters
from sdlora.objectives import DiffusionObjective
from sdlora.training.accelerator import weight_dtype_for
from sdlora.training.step import step_generator


@pytest.fixture
def unet(tiny_model):
    model = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    model.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=4)
    return model


def _loss(unet, objective, latents, text, step):
    gen = step_generator(0, step, 0, 0, torch.device("cpu"))
    return objective.training_loss(lambda x, t: unet(x, t, encoder_hidden_states=text).sample, latents, gen)


def test_loss_at_fixed_noise_and_timesteps_falls(unet, tiny_model):
    scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    objective = DiffusionObjective(scheduler)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    optimizer = torch.optim.AdamW(lora_parameters(unet), lr=1e-2)
    with torch.no_grad():
        before = _loss(unet, objective, latents, text, step=1).item()
    for _ in range(40):
        loss = _loss(unet, objective, latents, text, step=1)  # same noise and timesteps every time
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = _loss(unet, objective, latents, text, step=1).item()
    assert after < 0.7 * before, (before, after)


def test_step_generator_is_a_pure_function_of_its_inputs():
    draw = lambda *k: torch.randn(4, generator=step_generator(*k, torch.device("cpu")))  # noqa: E731
    assert torch.equal(draw(1, 5, 0, 0), draw(1, 5, 0, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 6, 0, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 5, 1, 0))
    assert not torch.equal(draw(1, 5, 0, 0), draw(1, 5, 0, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(tiny_model, prediction_type):
    # Hang et al. 2023 (arXiv 2303.09556), eq. 3.4: w_t = min(SNR_t, gamma) / SNR_t for epsilon targets and
    # min(SNR_t, gamma) / (SNR_t + 1) for v targets, SNR_t = alpha_bar_t / (1 - alpha_bar_t); computed here
    # from the beta schedule itself, not from the scheduler's alphas_cumprod.
    scheduler = DDPMScheduler.from_pretrained(
        tiny_model, subfolder="scheduler", prediction_type=prediction_type
    )
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = alpha_bar[timesteps] / (1 - alpha_bar[timesteps])
    gamma = 5.0
    expected_w = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    pred = torch.zeros(5, 4, 2, 2)
    target = torch.arange(1.0, 6.0).reshape(5, 1, 1, 1).expand(5, 4, 2, 2)  # per-sample MSE = (i+1)^2
    got = DiffusionObjective(scheduler, prediction_type, gamma).weighted_loss(pred, target, timesteps)
    expected = (expected_w * torch.arange(1.0, 6.0, dtype=torch.float64) ** 2).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = DiffusionObjective(scheduler, prediction_type).weighted_loss(pred, target, timesteps)
    assert plain.item() == pytest.approx(11.0)


def test_noise_is_computed_in_fp32_under_bf16_weights(tiny_model):
    # In bf16, alpha_bar at t=0 (0.99915) rounds to 1: noising in the weight dtype adds no noise at all there.
    scheduler = DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")
    latents = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 1])
    noisy, target = DiffusionObjective(scheduler).noised(latents, noise, t)
    assert noisy.dtype == torch.float32 and target.dtype == torch.float32
    assert (noisy - latents.float()).abs().mean() > 0.01  # sqrt(1 - 0.99915) * |noise| ~ 0.023
    in_bf16 = scheduler.add_noise(latents, noise.to(torch.bfloat16), t)
    assert (in_bf16.float() - latents.float()).abs().mean() < 0.01  # what computing in bf16 gave


def test_v_prediction_target_is_the_velocity(tiny_model):
    scheduler = DDPMScheduler.from_pretrained(
        tiny_model, subfolder="scheduler", prediction_type="v_prediction"
    )
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    _, target = DiffusionObjective(scheduler, "v_prediction").noised(latents, noise, t)
    a = scheduler.alphas_cumprod[t].reshape(2, 1, 1, 1)
    assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-5)


def test_fp16_is_refused_on_cpu_only():
    with pytest.raises(UserError, match="bf16 or no"):
        weight_dtype_for("fp16", torch.device("cpu"))
    assert weight_dtype_for("fp16", torch.device("cuda")) == torch.float16
    assert weight_dtype_for("bf16", torch.device("cpu")) == torch.bfloat16
    assert weight_dtype_for("no", torch.device("cpu")) == torch.float32


def test_allow_tf32_keeps_the_precision_api_usable():
    # In a fresh process: the setting is global. Inductor calls get_float32_matmul_precision(), which raised
    # RuntimeError after the legacy allow_tf32 flags were mixed with oneDNN's new precision API.
    code = (
        "import torch; from sdlora.training.accelerator import allow_fast_fp32_math; "
        "allow_fast_fp32_math(torch.device('cpu')); print(torch.get_float32_matmul_precision()); "
        "print(torch.backends.mkldnn.conv.fp32_precision)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["medium", "bf16"]


def test_the_first_signal_asks_to_stop_and_a_second_ctrl_c_stops_at_once():
    code = (
        "import os, signal, time; from sdlora.training.control import StopRequest; s = StopRequest(); "
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); print('asked', s.signal, flush=True); "
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('still running')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["asked", str(int(signal.SIGINT))]
    assert result.returncode == -signal.SIGINT  # the default action: ended at once, no cleanup loop


def test_offset_noise_adds_one_gaussian_draw_per_example_and_channel():
    # crosslabs.org/blog/diffusion-with-offset-noise: noise + offset * N(0, 1) of shape (B, C, 1, 1),
    # drawn from the same stream right after the per-pixel noise.
    objective = DiffusionObjective(DDPMScheduler(), noise_offset=0.1)
    noise = objective.sample_noise(torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(2, 4, 8, 8, generator=g) + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.equal(noise, expected)
    plain = DiffusionObjective(DDPMScheduler()).sample_noise(
        torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(3)
    )
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))
