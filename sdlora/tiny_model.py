"""The built-in tiny model: a Stable-Diffusion-1.x-shaped pipeline with random weights.

No weights can be downloaded on the machines this project is developed and tested on, so it builds
its own model from configs: same interfaces as SD 1.x (VAE with 8x downsampling, 4 latent channels and
SD's scaling factor; a cross-attention UNet; a CLIP text encoder with a working CLIP tokenizer; SD's
noise schedule), small enough that a training step takes a fraction of a second on 2 CPU cores.

    python -m sdlora.tiny_model --output_dir models/tiny-sd    # build it at any path

Scripts build it on first use at DEFAULT_TINY_MODEL_DIR (git-ignored) when no model is named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODEL_DIR = REPO_ROOT / "models" / "tiny-sd"
TINY_RESOLUTION = 64  # native size: UNet sample_size 8 x VAE scale factor 8

# Words the tokenizer knows whole; anything else falls back to characters, as CLIP's BPE would.
_WORDS = """a an the of on in with and at by to from under over near behind front small big large tiny
red green blue yellow orange purple pink black white gray grey brown gold silver dark light bright
circle circles square squares triangle triangles star stars line lines stripe stripes dot dots ring
shape shapes pattern grid checkerboard gradient background sky sea sun moon tree trees house cat dog
bird flower flowers mountain mountains river road car boat city photo painting drawing picture
portrait landscape style art artwork illustration render sketch simple abstract colorful sunset
night day one two three four many some is are two-tone centered top bottom left right middle""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: Path) -> int:
    """Write vocab.json and merges.txt for a small CLIP BPE tokenizer; return the vocabulary size."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = f"{merged} {piece}"
            if pair not in merges:
                merges.append(pair)
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocab)


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny StableDiffusionPipeline in memory; the same seed gives the same weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        sample_size=TINY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),  # four blocks: 8x downsampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    # SD 1.x's noise schedule and its default inference scheduler.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(output_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and save it in the diffusers layout; atomic, so readers never see half of it."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        build_tiny_pipeline(seed).save_pretrained(tmp)
        # Also the slow tokenizer's files, so older transformers releases load the tokenizer too.
        write_clip_tokenizer_files(tmp / "tokenizer")
        os.replace(tmp, output_dir)
    except OSError:
        # Another process (a second accelerate rank, a parallel test) finished first: use its copy.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (output_dir / "model_index.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def ensure_tiny_model(path: str | Path = DEFAULT_TINY_MODEL_DIR) -> Path:
    """Path of the tiny model, building it there first if it is not there yet."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        save_tiny_model(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the built-in tiny Stable Diffusion model.")
    parser.add_argument("--output_dir", default=str(DEFAULT_TINY_MODEL_DIR), help="where to save it")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    print(save_tiny_model(args.output_dir, args.seed))


if __name__ == "__main__":
    main()
