"""The objective's options against independent computations of their formulas: loss kinds and Huber
schedules, debiased estimation and v-prediction scaling, the timestep distributions and bias, pyramid noise,
input perturbation, adaptive offset noise, zero terminal SNR; and the EMA's recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdlora.objectives import (
    DiffusionObjective,
    LossOptions,
    NoiseOptions,
    TimestepSampler,
    training_scheduler,
)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """SD's scaled-linear schedule, from the betas themselves (float64), not the scheduler."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t]


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_each_loss_kind_and_huber_schedule_follows_kohyas_formula(loss_type, schedule):
    objective = DiffusionObjective(DDPMScheduler(**SD), loss=LossOptions(loss_type, 0.2, schedule))
    t = torch.tensor([0, 300, 999])
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    d = (pred - target).double()
    if schedule == "constant":
        c = torch.full((3,), 0.2, dtype=torch.float64)
    elif schedule == "exponential":  # exp(-alpha t), alpha = -ln(c) / T: 1 at t=0, c at t=T
        c = torch.exp(t.double() * math.log(0.2) / 1000)
    else:  # (1 - c) / (1 + sigma_t)^2 + c
        a = alpha_bar(t)
        c = (1 - 0.2) / (1 + ((1 - a) / a).sqrt()) ** 2 + 0.2
    c = c.view(3, 1, 1, 1)
    expected = {
        "l2": d**2,
        "l1": d.abs(),
        "huber": 2 * c * ((d**2 + c**2).sqrt() - c),
        "smooth_l1": 2 * ((d**2 + c**2).sqrt() - c),
    }[loss_type].mean()
    assert objective.weighted_loss(pred, target, t).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_and_v_scaling_weigh_each_example_as_kohya_does(prediction_type):
    t = torch.tensor([0, 10, 500, 999])
    snr = torch.clamp(alpha_bar(t) / (1 - alpha_bar(t)), max=1000)  # kohya caps it at 1000
    v = prediction_type == "v_prediction"
    debias = 1 / (snr + 1) if v else 1 / snr.sqrt()  # arXiv 2310.08442; kohya's v form
    options = LossOptions(debiased_estimation=True, scale_v_pred_like_noise_pred=True)
    objective = DiffusionObjective(DDPMScheduler(**SD), prediction_type, 5.0, loss=options)
    min_snr = torch.clamp(alpha_bar(t) / (1 - alpha_bar(t)), max=5.0)
    min_snr = min_snr / (alpha_bar(t) / (1 - alpha_bar(t)) + (1 if v else 0))
    expected = min_snr * debias * (snr / (snr + 1) if v else 1)
    assert torch.allclose(objective.loss_weights(t).double(), expected, rtol=1e-4)


def test_timestep_distributions_and_bias():
    g = torch.Generator().manual_seed(0)
    n = 40_000

    def draw(**kw):
        return TimestepSampler(1000, **kw).sample(n, g, "cpu").double()

    plain = draw(low=200, high=700)
    assert plain.min() >= 200 and plain.max() <= 699 and abs(plain.mean().item() - 449.5) < 5
    logit = draw(sampling="logit_normal", logit_mean=1.0, logit_std=0.5)  # median sigmoid(1.0) * 1000
    assert abs(logit.median().item() - 1000 * torch.sigmoid(torch.tensor(1.0)).item()) < 8
    narrow = draw(sampling="sigmoid", sigmoid_scale=0.1)  # sigmoid of a tight normal: near the middle
    assert narrow.std() < 0.05 * 1000 and abs(narrow.mean().item() - 500) < 3
    later = draw(bias="later", bias_multiplier=3.0, bias_portion=0.25)
    # the last 250 steps weigh 3 each against 1: 750 / (750 + 750) of the draws
    assert abs((later >= 750).double().mean().item() - 0.5) < 0.01
    ranged = draw(bias="range", bias_multiplier=4.0, bias_begin=100, bias_end=200, low=50)
    assert ranged.min() >= 50 and abs((ranged < 200).double().mean().item() - (50 + 400) / (950 + 300)) < 0.01


def test_noise_options_against_their_formulas():
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 16, 16, generator=g) + 3.0
    options = NoiseOptions(offset=0.1, adaptive_scale=0.5, perturbation=0.2)
    noise, noisy_from = options.sample(latents, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    base, offset = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 1, 1, generator=g)
    strength = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()  # kohya's adaptive offset
    assert torch.allclose(noise, base + strength * offset)
    assert torch.allclose(noisy_from, noise + 0.2 * torch.randn(2, 4, 16, 16, generator=g))  # only the input
    pyramid, same = NoiseOptions(multires_iterations=3, multires_discount=0.5).sample(
        latents, torch.Generator().manual_seed(2)
    )
    # kohya's pyramid_noise_like: level i is N(0, 1) at size / r^i (r in [2, 4)), upsampled, times discount^i.
    g = torch.Generator().manual_seed(2)
    expected = torch.randn(2, 4, 16, 16, generator=g).double()
    for i in range(3):
        r = 2 + 2 * torch.rand((), generator=g).item()
        size = max(1, int(16 / r**i))
        level = torch.randn(2, 4, size, size, generator=g)
        expected += torch.nn.functional.interpolate(level, size=(16, 16), mode="bilinear").double() * 0.5**i
    assert pyramid is same and torch.allclose(pyramid.double(), expected / expected.std(), atol=1e-5)


def test_input_perturbation_moves_the_input_and_not_the_target():
    objective = DiffusionObjective(DDPMScheduler(**SD), noise=NoiseOptions(perturbation=0.5))
    seen = {}

    def denoise(noisy, t):
        seen["noisy"], seen["t"] = noisy, t
        return torch.zeros_like(noisy)

    latents = torch.zeros(1, 4, 8, 8)
    loss = objective.training_loss(denoise, latents, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    extra = torch.randn(1, 4, 8, 8, generator=g)
    a = alpha_bar(seen["t"]).float()
    assert torch.allclose(seen["noisy"], (1 - a).sqrt() * (noise + 0.5 * extra), atol=1e-6)
    assert loss.item() == pytest.approx((noise**2).mean().item(), rel=1e-5)  # the target is the plain noise


def test_zero_terminal_snr_rescales_the_betas_to_no_signal_at_the_last_step():
    rescaled = training_scheduler(DDPMScheduler(**SD), zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert DDPMScheduler(**SD).alphas_cumprod[-1].item() > 1e-3  # SD's own: the mean colour survives
    assert training_scheduler(DDPMScheduler(**SD), zero_terminal_snr=False).alphas_cumprod[-1] > 1e-3
    objective = DiffusionObjective(rescaled, "v_prediction", 5.0, loss=LossOptions(debiased_estimation=True))
    assert torch.isfinite(objective.loss_weights(torch.tensor([0, 999]))).all()


def test_the_ema_follows_its_recurrence_with_warm_up():
    from sdlora.training.ema import LoraEMA

    param = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEMA([param], decay=0.9, interval=2)
    expected, values = torch.zeros(3, dtype=torch.float64), []
    for step in range(1, 11):
        with torch.no_grad():
            param.add_(1.0)
        ema.step(step)
        if step % 2 == 0:
            n = step // 2 - 1
            d = min(0.9, (1 + n) / (10 + n))  # diffusers' EMAModel warm-up
            expected = d * expected + (1 - d) * step
        values.append(ema.shadow[0].clone())
    assert torch.allclose(ema.shadow[0].double(), expected) and ema.updates == 5
    with ema.applied():
        assert torch.equal(param.data, ema.shadow[0])
    assert torch.equal(param.data, torch.full((3,), 10.0))  # the trained weights back, exactly
