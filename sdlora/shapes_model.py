"""The parts of `tiny-shapes` (sdlora/pretrain_shapes.py trains them): a CLIP tokenizer that knows the shapes
world's words whole, a frozen random CLIP text encoder, an 8x VAE, a UNet with attention at every level, and
DDIM with zero terminal SNR, v-prediction and trailing timesteps."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .shapes import SIZE, vocabulary
from .tiny_model import write_clip_tokenizer_files

MAX_TOKENS = 16  # BOS + the longest caption's 9 words + EOS, with room to spare


def write_tokenizer_files(folder: Path, words: list[str]) -> None:
    """vocab.json and merges.txt of a CLIP BPE tokenizer that knows the shapes world's `words`."""
    write_clip_tokenizer_files(folder, words)


def build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp), vocabulary())
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(seed: int, latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=SIZE,
        block_out_channels=(16, 32, 64, 64),  # four blocks: 8x downsampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
    )


def build_unet(seed: int, latent_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    # Cross-attention at every level, so a LoRA on the attention projections reaches all of them
    # (NOTES: the prototype's attention-free 16x16 level kept such a LoRA from drawing a new shape).
    return UNet2DConditionModel(
        sample_size=SIZE // 8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_scheduler():
    """DDIM with zero terminal SNR, v-prediction and trailing timesteps (Lin et al. 2023): the first
    step starts from pure noise, so nothing of the training picture's mean colour is left for the model
    to lean on, and it must take the background from the caption."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # (unused with trailing spacing; diffusers warns about configs without it)
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, output_dir: Path) -> None:
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # Also the slow tokenizer's files, as tiny_model does, so any transformers release loads it.
    write_tokenizer_files(output_dir / "tokenizer", vocabulary())
