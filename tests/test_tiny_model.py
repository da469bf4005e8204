"""The built-in tiny model: SD-shaped, loadable by diffusers, deterministic, fast."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from sdlora.models import native_resolution
from sdlora.tiny_model import TINY_RESOLUTION, build_tiny_pipeline


def test_loads_into_pipeline_and_generates_native_size(tiny_model):
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_model / sub).exists(), sub
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (TINY_RESOLUTION, TINY_RESOLUTION)
    assert native_resolution(str(tiny_model)) == TINY_RESOLUTION


def test_sd_shaped_interfaces(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 5  # known words are single tokens: BOS a red circle EOS


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
