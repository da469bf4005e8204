"""The built-in tiny models: Stable-Diffusion-shaped pipelines (SD 1.x, SD 2.x, SDXL, SD 3.5) with random weights.

No weights can be downloaded on the machines this project is developed and tested on, so it builds
its own models from configs, with the interfaces of each family (VAE with 8x downsampling, 4 latent
channels and the family's scaling factor; a cross-attention UNet; CLIP text encoders with a working
CLIP tokenizer; SD's noise schedule; SD 2's v-prediction; SDXL's second text encoder and size/crop
conditioning), small enough that a training step takes a fraction of a second on 2 CPU cores.

    python -m sdlora.tiny_model --output_dir models/tiny-sd               # build it at any path
    python -m sdlora.tiny_model --family sdxl --output_dir models/tiny-sdxl

Scripts build them on first use under models/ (git-ignored): `tiny` (or no model) is the SD 1.x one,
`tiny-sd2` and `tiny-sdxl` the others. `tiny-shapes` is the one pretrained tiny model, committed under
sdlora/assets/ (sdlora/pretrain_shapes.py made it): an SD 1.x-shaped model that draws the shapes world
of sdlora/shapes.py, for demos and tests of what a LoRA learns.

    python -m sdlora.tiny_model --pretrained --output_dir models/tiny-shapes   # a copy of it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .tiny_sd3 import build_tiny_sd3

REPO_ROOT = Path(__file__).resolve().parent.parent


# Where each family's tiny model is built on first use (git-ignored), by family name.
TINY_MODEL_DIRS = {"sd1": "tiny-sd", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}


# The committed pretrained model (python -m sdlora.pretrain_shapes); scripts read it where it is.
TINY_SHAPES_DIR = Path(__file__).resolve().parent / "assets" / "tiny-shapes"


def default_tiny_model_dir(family: str = "sd1") -> Path:
    return REPO_ROOT / "models" / TINY_MODEL_DIRS[family]


TINY_RESOLUTION = 64  # native size: UNet sample_size 8 x VAE scale factor 8
TINY_SD2_RESOLUTION = 96  # 1.5x SD 1.x's, as SD 2.x-768 is to SD 1.5
TINY_SDXL_RESOLUTION = 128  # 2x SD 1.x's, as SDXL's 1024 is to 512
FAMILIES = ("sd1", "sd2", "sdxl", "sd3")  # sd3: sdlora/tiny_sd3.py
# The name a script resolves to each built-in tiny model, and where it is built on first use.
TINY_MODEL_NAMES = {
    "tiny": "sd1",
    "tiny-sd": "sd1",
    "tiny-sd2": "sd2",
    "tiny-sdxl": "sdxl",
    "tiny-sd3": "sd3",
}

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


def write_clip_tokenizer_files(folder: Path, words: list[str] | None = None) -> int:
    """Write vocab.json and merges.txt for a small CLIP BPE tokenizer that knows `words` (default: the tiny
    models' words) and spells anything else in byte-level characters; return the vocabulary size."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS if words is None else words:
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


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    tokenizer.model_max_length = 77
    return tokenizer


def _tiny_vae(seed: int, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=TINY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),  # four blocks: 8x downsampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=scaling_factor,
    )


def _tiny_clip_config(tokenizer, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=32,
        hidden_act=hidden_act,
    )


def _sd_scheduler_kwargs() -> dict:
    # SD's noise schedule, shared by every family (SDXL kept SD 1.x's betas).
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def build_tiny_pipeline(seed: int = 0, family: str = "sd1"):
    """Build a tiny pipeline of `family` in memory; the same seed gives the same weights."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: use one of {', '.join(FAMILIES)}")
    builders = {"sd1": _build_sd1, "sd2": _build_sd2, "sdxl": _build_sdxl, "sd3": _build_sd3}
    return builders[family](seed)


def _build_sd3(seed: int):
    return build_tiny_sd3(seed, _tiny_tokenizer, _tiny_clip_config)


def _build_sd1(seed: int):
    """SD 1.x: one CLIP text encoder (quick_gelu), 1x1-conv transformer projections, epsilon, PNDM."""
    from diffusers import PNDMScheduler

    # SD 1.x's default inference scheduler.
    scheduler = PNDMScheduler(
        **_sd_scheduler_kwargs(),
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return _build_sd(seed, TINY_RESOLUTION, scheduler, "quick_gelu", attention_head_dim=8)


def _build_sd2(seed: int):
    """SD 2.x-768: OpenCLIP-style text encoder (gelu), linear transformer projections, per-block head
    dims, v-prediction with DDIM, and a native size 1.5x SD 1.x's (96 px here, as 768 is to 512)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        **_sd_scheduler_kwargs(),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return _build_sd(
        seed, TINY_SD2_RESOLUTION, scheduler, "gelu", attention_head_dim=(4, 8), use_linear_projection=True
    )


def _build_sd(seed: int, resolution: int, scheduler, hidden_act: str, **unet_config):
    """A StableDiffusionPipeline of two UNet levels; what tells SD 1.x from 2.x comes as arguments."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        **unet_config,
    )
    vae = _tiny_vae(seed + 1, 0.18215)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, hidden_act=hidden_act))
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


def _build_sdxl(seed: int):
    """SDXL: two text encoders (the second with a projection), text_time added conditioning, three
    UNet levels (no attention in the first, two transformer layers in the last), Euler, 128 px native."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = _tiny_tokenizer(), _tiny_tokenizer()
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SDXL_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=64,  # both encoders' hidden states, concatenated (32 + 32)
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,  # pooled text + 6 size/crop numbers
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed + 1, 0.13025)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(
        **_sd_scheduler_kwargs(),
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def save_tiny_model(output_dir: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Build the tiny model and save it in the diffusers layout; atomic, so readers never see half of it."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        build_tiny_pipeline(seed, family).save_pretrained(tmp)
        # Also the slow tokenizer's files, so older transformers releases load the tokenizer too.
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (tmp / tokenizer).is_dir():
                write_clip_tokenizer_files(tmp / tokenizer)
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


def ensure_tiny_model(path: str | Path | None = None, family: str = "sd1") -> Path:
    """Path of the tiny model of `family`, building it there first if it is not there yet."""
    path = Path(path) if path is not None else default_tiny_model_dir(family)
    if not (path / "model_index.json").is_file():
        save_tiny_model(path, family=family)
    return path


def copy_tiny_shapes(output_dir: str | Path) -> Path:
    """A copy of the committed tiny-shapes model at `output_dir`, written atomically."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        shutil.copytree(TINY_SHAPES_DIR, tmp, dirs_exist_ok=True)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a built-in tiny Stable Diffusion model.")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="sd1",
        help="sd1 (SD 1.x), sd2 (SD 2.x, v-prediction), sdxl or sd3 (SD 3.5)",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where to save it (default: models/tiny-sd, tiny-sd2, tiny-sdxl or tiny-sd3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help="copy tiny-shapes instead, the pretrained SD 1.x-shaped model that draws shapes "
        "(default --output_dir: models/tiny-shapes)",
    )
    args = parser.parse_args()
    if args.pretrained:
        print(copy_tiny_shapes(args.output_dir or REPO_ROOT / "models" / "tiny-shapes"))
        return
    print(save_tiny_model(args.output_dir or default_tiny_model_dir(args.family), args.seed, args.family))


if __name__ == "__main__":
    main()
