"""The built-in tiny SD 3.5: a StableDiffusion3Pipeline with random weights, built offline.

It has every interface of SD 3.5 Medium at a size that trains in a fraction of a second a step on one core:
an MMDiT-X transformer (SD3Transformer2DModel with a dual-attention layer and RMS qk-norm) whose width is
64 per layer (ComfyUI's MMDiT derives its width from the depth so), 16-channel latents with SD3's VAE
scaling and shift factors, CLIP-L and CLIP-G with projections (pooled outputs), a T5 encoder wider than
the two CLIPs together (their hidden states are zero-padded to its width, as in the real model) with a
Unigram tokenizer made here, and the flow-matching Euler scheduler with SD3's shift of 3.

    python -m sdlora.tiny_model --family sd3 --output_dir models/tiny-sd3

sdlora.tiny_model builds it (it passes the CLIP tokenizer and text-encoder config all tiny models share).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TINY_SD3_RESOLUTION = 128  # native size: transformer sample_size 16 x VAE factor 8 (1024 for SD 3.5)
T5_WIDTH = 96  # wider than the two CLIPs' 32 + 32, so the zero padding of their hidden states is exercised
DEPTH = 2  # transformer layers; ComfyUI's MMDiT is 64 wide per layer, with one 64-wide head per layer

# Whole words of the T5 tokenizer (SentencePiece pieces start with "▁"); other text falls back to letters.
_T5_WORDS = """a the of on in with and red green blue yellow orange purple black white circle square
triangle star shape background small big photo painting style drawing simple one two""".split()


def t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer over a small Unigram vocabulary: pad, eos and unk first, as T5's (ids 0, 1, 2)."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    pieces += [f"▁{w}" for w in _T5_WORDS]
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
        chr(c) for c in range(ord("0"), ord("9") + 1)
    ]
    pieces += list(",.-'!?")
    vocab = [(p, 0.0 if i < 3 else -1.0 - (i if len(p) == 1 else 0) / 100) for i, p in enumerate(pieces)]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def _tiny_t5(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _tiny_sd3_vae(seed: int):
    """SD3's VAE: 16 latent channels, no quant convs, scaling 1.5305 and shift 0.0609 (its config's)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=TINY_SD3_RESOLUTION,
        block_out_channels=(16, 32, 32, 32),  # 8x downsampling, as in SD3
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_transformer(seed: int = 0):
    """The tiny MMDiT-X: SD 3.5 Medium's layer kinds (dual attention in layer 0, RMS qk-norm) at width 128."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=TINY_SD3_RESOLUTION // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=DEPTH,
        attention_head_dim=64,
        num_attention_heads=DEPTH,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=64 * DEPTH,
        pooled_projection_dim=64,  # CLIP-L's and CLIP-G's pooled outputs, concatenated
        pos_embed_max_size=32,  # room for buckets up to 512 px (32 patches a side)
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def build_tiny_sd3(seed: int, clip_tokenizer: Callable, clip_config: Callable):
    """The tiny StableDiffusion3Pipeline; `clip_tokenizer()` and `clip_config(tokenizer, hidden_act)` are
    the tiny CLIP pieces of sdlora.tiny_model, shared with the other tiny models."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = tiny_sd3_transformer(seed)
    vae = _tiny_sd3_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, hidden_act="quick_gelu"))  # CLIP-L
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, hidden_act="gelu"))  # CLIP-G
    text_encoder_3 = _tiny_t5(tokenizer_3, seed + 4)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD 3.5's
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
