"""Cache keys: any change to data, encoder weights or preprocessing gives a new key, never a stale cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from sdlora.cache import latent_cache_key, text_cache_key


@pytest.fixture(scope="module")
def parts(tiny_model):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    text = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    return vae, text, tokenizer


def _args(**changes):
    base = dict(
        resolution=64,
        center_crop=True,
        random_flip=True,
        image_interpolation_mode="lanczos",
        background_rgb=(255, 255, 255),
    )
    return SimpleNamespace(**{**base, **changes})


def test_latent_key_changes_with_every_input(parts):
    vae = parts[0]
    key = latent_cache_key("data-a", vae, _args(), torch.float32)
    assert key == latent_cache_key("data-a", vae, _args(), torch.float32)
    changed = [
        latent_cache_key("data-b", vae, _args(), torch.float32),
        latent_cache_key("data-a", vae, _args(resolution=128), torch.float32),
        latent_cache_key("data-a", vae, _args(center_crop=False), torch.float32),
        latent_cache_key("data-a", vae, _args(random_flip=False), torch.float32),
        latent_cache_key("data-a", vae, _args(image_interpolation_mode="bilinear"), torch.float32),
        latent_cache_key("data-a", vae, _args(), torch.bfloat16),
    ]
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3  # a fine-tuned VAE differs in a few weights only
    changed.append(latent_cache_key("data-a", vae, _args(), torch.float32))
    assert key not in changed and len(set(changed)) == len(changed)


def test_text_key_changes_with_captions_and_encoder(parts):
    _, text, tokenizer = parts
    key = text_cache_key("data-a", text, tokenizer, torch.float32)
    assert key != text_cache_key("data-b", text, tokenizer, torch.float32)
    with torch.no_grad():
        text.get_parameter("final_layer_norm.weight")[0] += 1e-3
    assert key != text_cache_key("data-a", text, tokenizer, torch.float32)
