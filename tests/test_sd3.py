"""SD 3.5 through the seams, without the trainer: the flow-matching objective against the SD3 paper's
formulas computed here, the family (detection, prompts as StableDiffusion3Pipeline encodes them, layer
sets), and its kohya/ComfyUI names (fused qkv, both ways, exactly)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdlora.errors import UserError
from sdlora.objectives.flow import WEIGHTING_SCHEMES, FlowMatchingObjective

N = 200_000  # draws for the density checks: a 20-bin histogram's bins then hold about 10,000 each


def histogram(sigmas: torch.Tensor, bins: int = 20) -> torch.Tensor:
    return torch.histc(sigmas, bins=bins, min=0.0, max=1.0) / len(sigmas) * bins  # a density estimate


def bin_means(density, bins: int = 20, points: int = 2000) -> torch.Tensor:
    """The mean of `density` over each bin of [0, 1], by the midpoint rule."""
    t = (torch.arange(bins * points, dtype=torch.float64) + 0.5) / (bins * points)
    return density(t).reshape(bins, points).mean(dim=1).float()


def logit_normal(t: torch.Tensor, m: float, s: float) -> torch.Tensor:
    """SD3 paper, section 3.1: pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit t - m)^2 / 2s^2)."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def mode_density(t: torch.Tensor, s: float) -> torch.Tensor:
    """pi_mode(t; s) = |d/dt f_mode^-1(t)|, f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u): by inverting
    f_mode numerically on a fine grid (it decreases monotonically for |s| < 2 / (pi - 2))."""
    u = torch.linspace(0, 1, 400_001, dtype=torch.float64)
    f = 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    dfdu = -1 - s * (-math.pi / 2 * torch.sin(math.pi * u) + 1)
    index = torch.searchsorted(-f, -t).clamp(1, len(u) - 1)  # f decreasing
    return 1 / dfdu[index].abs()


def shifted_density(density, shift: float):
    """The density of sigma = shift t / (1 + (shift - 1) t) when t has `density`: t = sigma / (shift - (shift - 1) sigma)."""

    def pushed(sigma):
        t = sigma / (shift - (shift - 1) * sigma)
        return density(t) * shift / (shift - (shift - 1) * sigma) ** 2

    return pushed


@pytest.mark.parametrize(
    "scheme,kwargs,density",
    [
        ("logit_normal", {"logit_mean": 0.0, "logit_std": 1.0}, lambda t: logit_normal(t, 0.0, 1.0)),
        ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.6}, lambda t: logit_normal(t, 0.5, 0.6)),
        ("mode", {"mode_scale": 1.29}, lambda t: mode_density(t, 1.29)),
        ("none", {}, lambda t: torch.ones_like(t)),
    ],
)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_levels_follow_the_papers_densities_and_the_shift(scheme, kwargs, density, shift):
    objective = FlowMatchingObjective(shift=shift, weighting_scheme=scheme, **kwargs)
    sigmas = objective.sample_sigmas(N, torch.Generator().manual_seed(0), "cpu")
    expected = bin_means(shifted_density(density, shift) if shift != 1 else density)
    # (binomial noise of a bin's count: about 1% of it; 4% allows for the steep edges of some bins)
    assert torch.allclose(histogram(sigmas), expected, rtol=0.04, atol=0.02), (histogram(sigmas), expected)
    if scheme == "logit_normal" and kwargs["logit_mean"] > 0:  # the paper's orientation: more noise
        assert sigmas.mean() > 0.5


def test_noisy_latents_and_target_are_the_straight_line_and_its_velocity():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    noisy, target = FlowMatchingObjective.noised(x0, eps, sigmas)
    for i, s in enumerate(sigmas.tolist()):  # x_t = (1 - t) x_0 + t eps, v = eps - x_0 (section 2)
        assert torch.allclose(noisy[i], (1 - s) * x0[i] + s * eps[i])
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.allclose(target, eps - x0)
    # Integrating the true velocity from sigma back to 0 recovers the data: x_0 = x_t - sigma v.
    assert torch.allclose(noisy[1] - 0.3 * target[1], x0[1], atol=1e-6)


def test_cosmap_and_sigma_sqrt_weight_the_loss_as_the_diffusers_script_does():
    s = torch.tensor([0.1, 0.5, 0.9])
    cosmap = FlowMatchingObjective(weighting_scheme="cosmap").loss_weights(s)
    assert torch.allclose(cosmap, 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    # The cosmap weight is the paper's cosmap density: over uniform draws it integrates to 1.
    assert abs(bin_means(lambda t: 2 / (math.pi * (1 - 2 * t + 2 * t**2)), 1).item() - 1) < 1e-4
    assert torch.allclose(FlowMatchingObjective(weighting_scheme="sigma_sqrt").loss_weights(s), s**-2.0)
    assert FlowMatchingObjective(weighting_scheme="logit_normal").loss_weights(s) is None


def test_training_loss_is_the_velocity_mse_at_the_drawn_sigmas_and_timesteps():
    objective = FlowMatchingObjective(shift=3.0, weighting_scheme="cosmap")
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    seen = {}

    def denoise(noisy, t):  # a fixed function of its inputs, so the loss can be recomputed by hand
        seen["t"] = t
        return 0.5 * noisy

    loss = objective.training_loss(denoise, latents, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same stream: noise first, then one uniform draw per example
    noise = torch.randn(latents.shape, generator=g)
    u = torch.rand((2,), generator=g)
    sigma = 3 * u / (1 + 2 * u)
    s = sigma.view(-1, 1, 1, 1)
    per_example = ((0.5 * ((1 - s) * latents + s * noise) - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    weights = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    assert torch.allclose(seen["t"], sigma * 1000)  # the transformer sees sigma x 1000, as when sampling
    assert torch.allclose(loss, (per_example * weights).mean())


def test_held_out_loss_is_scored_at_fixed_unshifted_sigmas():
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    steps = torch.tensor([62, 937])
    losses = {
        shift: FlowMatchingObjective(shift=shift, weighting_scheme="sigma_sqrt").probe_losses(
            lambda x, t: torch.zeros_like(x), latents, noise, steps
        )
        for shift in (1.0, 3.0)
    }
    assert losses[1.0] == losses[3.0]  # neither the shift nor the weighting changes the probe
    assert losses[1.0] == pytest.approx(((noise - latents) ** 2).mean(dim=(1, 2, 3)).tolist(), rel=1e-6)


def test_options_without_meaning_for_flow_matching_are_refused_by_name():
    from sdlora.config.flow import WEIGHTING_SCHEMES as FLAG_CHOICES
    from sdlora.objectives import NoiseOptions
    from sdlora.objectives.flow import flow_objective

    assert FLAG_CHOICES == WEIGHTING_SCHEMES
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000, shift=3.0))
    flow = SimpleNamespace(weighting_scheme="mode", mode_scale=1.0, timestep_shift=None)
    objective = SimpleNamespace(snr_gamma=None)
    loss = SimpleNamespace(
        loss_type="l2", huber_c=0.1, huber_schedule="snr", debiased_estimation_loss=False,
        scale_v_pred_loss_like_noise_pred=False,
    )  # fmt: skip
    timesteps = SimpleNamespace(
        timestep_sampling="uniform", timestep_bias_strategy="none", min_timestep=100, max_timestep=500,
        logit_mean=0.0, logit_std=1.0,
    )  # fmt: skip
    made = flow_objective(scheduler, flow, objective, loss, timesteps, NoiseOptions())
    assert made.shift == 3.0 and made.sigma_range == (0.1, 0.5) and made.weighting_scheme == "mode"
    sigmas = made.sample_sigmas(1000, torch.Generator().manual_seed(0), "cpu")
    assert sigmas.min() >= 0.1 and sigmas.max() < 0.5  # --min_timestep / --max_timestep, as kohya's
    with pytest.raises(UserError, match="--snr_gamma"):
        flow_objective(scheduler, flow, SimpleNamespace(snr_gamma=5.0), loss, timesteps, NoiseOptions())
    with pytest.raises(UserError, match="--timestep_sampling"):
        sampled = SimpleNamespace(**{**vars(timesteps), "timestep_sampling": "sigmoid"})
        flow_objective(scheduler, flow, objective, loss, sampled, NoiseOptions())


# --- the family --------------------------------------------------------------------------------------


def test_the_tiny_sd35_is_recognised_and_encodes_prompts_as_its_pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    from sdlora.families import SD3, detect_family, family_of_pipeline
    from sdlora.models import load_base_model

    assert detect_family(str(tiny_sd3)) is SD3
    assert SD3.native_resolution(str(tiny_sd3)) == 128 and SD3.size_multiple(str(tiny_sd3)) == 16
    base = load_base_model(str(tiny_sd3), t5_max_length=20)
    assert base.family is SD3 and type(base.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    prompts = ["a red circle on a white background", "two blue squares"]
    ours = base.encode_prompts(prompts, "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    assert family_of_pipeline(pipe) is SD3
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=20)  # fmt: skip
    assert ours["prompt_embeds"].shape == (2, 77 + 20, 96)  # CLIP-L + CLIP-G padded to T5's width, then T5
    assert torch.allclose(ours["prompt_embeds"], embeds, atol=1e-6)
    assert torch.allclose(ours["pooled"], pooled, atol=1e-6)
    with pytest.raises(UserError, match="flow matching"):
        SD3.prediction_type(base.noise_scheduler, "epsilon")


def test_layer_sets_adapt_both_streams_then_the_blocks_then_everything():
    from sdlora.families import SD3
    from sdlora.tiny_sd3 import tiny_sd3_transformer

    transformer = tiny_sd3_transformer()
    attn, attn_ff, every = (set(SD3.lora_targets(transformer, s)) for s in ("attn", "attn_ff", "all"))
    assert {"transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn2.to_v",
            "transformer_blocks.1.attn.to_out.0"} <= attn  # fmt: skip
    assert not any("ff" in n or "norm" in n for n in attn) and len(attn) == 12 + 7  # block 1: no to_add_out
    assert {"transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.norm1_context.linear"} <= attn_ff
    assert attn < attn_ff < every and {"pos_embed.proj", "context_embedder", "norm_out.linear"} <= every
    assert SD3.trainable_text_encoders == ("text_encoder", "text_encoder_2")  # T5 stays frozen


# --- kohya / ComfyUI names -------------------------------------------------------------------------


def random_lora(targets: list[str], rank: int = 4, dora: bool = False, seed: int = 0):
    """A LoRA on the tiny transformer's `targets` with every tensor random (B too), as LoraWeights."""
    from sdlora.families import SD3
    from sdlora.lora_weights import LoraWeights
    from sdlora.tiny_sd3 import tiny_sd3_transformer

    transformer = tiny_sd3_transformer()
    g = torch.Generator().manual_seed(seed)
    tensors, alphas = {}, {}
    for name in targets:
        weight = transformer.get_submodule(name).weight
        tensors[name + ".lora_A.weight"] = torch.randn(rank, *weight.shape[1:], generator=g)
        tensors[name + ".lora_B.weight"] = torch.randn(weight.shape[0], rank, 1, 1, generator=g).reshape(
            weight.shape[0], rank, *[1] * (weight.ndim - 2)
        )
        if dora:
            magnitude = (
                torch.rand(weight.shape[0], generator=g) + 0.5
            )  # peft's: (out,), (1, out, 1, 1) for a conv
            tensors[name + ".lora_magnitude_vector"] = (
                magnitude if weight.ndim == 2 else magnitude.view(1, -1, 1, 1)
            )
        alphas[name] = 8.0
    return LoraWeights({"transformer": tensors}, {"transformer": alphas}, SD3), transformer


def test_kohya_names_fuse_qkv_swap_adaln_halves_and_read_back_exactly(tmp_path):
    from sdlora.families import SD3
    from sdlora.lora_files import read_lora
    from sdlora.lora_weights import write_kohya
    from sdlora.tiny_sd3 import tiny_sd3_transformer

    weights, transformer = random_lora(SD3.lora_targets(tiny_sd3_transformer(), "all"), dora=True)
    path = write_kohya(weights, tmp_path / "kohya.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(path))
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape == (12, 128) and state[f"{qkv}.lora_up.weight"].shape == (
        384,
        12,
    )
    assert state[f"{qkv}.alpha"].item() == 24.0  # 3r x alpha / r: the same scale
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight" in state  # MMDiT-X
    assert "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight" in state
    assert not any("to_q" in k or "transformer_blocks" in k for k in state)
    # The fused delta is the three deltas stacked (up @ down, scaled by alpha / rank).
    fused = state[f"{qkv}.lora_up.weight"] @ state[f"{qkv}.lora_down.weight"] * 24.0 / 12
    parts = [weights.delta("transformer", f"transformer_blocks.0.attn.to_{s}") for s in "qkv"]
    assert torch.allclose(fused, torch.cat(parts), atol=1e-5)
    # The final norm's (scale, shift) rows are Stability's (shift, scale).
    final = state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    ours = weights.up("transformer", "norm_out.linear")
    assert torch.equal(final[:128], ours[128:]) and torch.equal(final[128:], ours[:128])
    back = read_lora(path)
    assert back.family is SD3 and set(back.parts) == {"transformer"}
    assert back.parts["transformer"].keys() == weights.parts["transformer"].keys()
    assert all(torch.equal(back.parts["transformer"][k], v) for k, v in weights.parts["transformer"].items())
    assert back.alphas == weights.alphas


def test_a_fused_qkv_lora_from_other_trainers_keeps_its_delta(tmp_path):
    """A qkv LoRA whose up is not block diagonal (trained fused) reads as q, k, v of the same deltas."""
    from safetensors.torch import save_file

    from sdlora.lora_files import read_lora

    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(4, 128, generator=g), torch.randn(384, 4, generator=g)
    name = "lora_unet_joint_blocks_1_context_block_attn_qkv"
    save_file(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
        str(tmp_path / "fused.safetensors"),
    )
    weights = read_lora(tmp_path / "fused.safetensors")
    deltas = [weights.delta("transformer", f"transformer_blocks.1.attn.add_{s}_proj") for s in "qkv"]
    assert torch.allclose(torch.cat(deltas), up @ down * 2.0 / 4, atol=1e-6)


def test_a_lora_of_another_family_is_refused_naming_both(tmp_path, tiny_model, tiny_sd3):
    from sdlora.families import SD1
    from sdlora.generation import load_pipeline
    from sdlora.lora_weights import LoraWeights, write_diffusers

    weights, _ = random_lora(["transformer_blocks.0.attn.to_q"])
    write_diffusers(weights, tmp_path / "sd3" / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match=r"a LoRA for SD 3\.5, but .* is SD 1\.x"):
        load_pipeline(str(tiny_model), tmp_path / "sd3")
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    sd1 = LoraWeights(
        {
            "unet": {
                f"{module}.lora_A.weight": torch.ones(2, 32),
                f"{module}.lora_B.weight": torch.ones(32, 2),
            }
        },
        {"unet": {module: 2.0}},
        SD1,
    )
    write_diffusers(sd1, tmp_path / "sd1" / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match=r"a LoRA for SD 1\.x, but .* is SD 3\.5"):
        load_pipeline(str(tiny_sd3), tmp_path / "sd1")


def test_header_names_tell_sd3_variants_as_kohya_writes_them():
    from sdlora.families import SD3, family_of_lora
    from sdlora.families.sd3 import variant

    assert variant({"qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}) == "5-medium"
    assert variant({"qk_norm": "rms_norm", "dual_attention_layers": []}) == "5-large"
    assert variant({"qk_norm": None}) == "medium"  # SD 3 Medium
    meta = SD3.kohya_metadata("flow_matching", {"qk_norm": "rms_norm", "dual_attention_layers": []})
    assert meta["ss_base_model_version"] == "5-large"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    te_only = {"text_encoder": {}, "text_encoder_2": {}}
    assert family_of_lora({"ss_base_model_version": "5-medium"}, [], {"unet": {}}) is SD3
    assert family_of_lora({}, ["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"], te_only) is SD3
