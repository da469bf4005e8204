"""Tiny captioning models with random weights, built offline from configs: BLIP-2, BLIP, ViT-GPT2, Florence-2,
a LLaVA vision-language model and a WD booru tagger in ONNX.

No weights can be downloaded where this project is developed and tested, so the captioning tests and
benchmark build their own models: the same classes, processors and folder layout as
`Salesforce/blip2-opt-2.7b`, `Salesforce/blip-image-captioning-large`, `nlpconnect/vit-gpt2-image-captioning`,
`florence-community/Florence-2-base`, a llava-hf / JoyCaption checkpoint and
`SmilingWolf/wd-eva02-large-tagger-v3`, with tokenizers generated here, small enough that captioning a batch
takes milliseconds on 2 CPU cores. Their captions are random words. Exporting the tagger needs the `onnx`
and `onnxscript` packages; the others need only transformers.

    python -m sdlora.tiny_captioners --output_dir models/tiny-captioners   # blip2/ blip/ ... wd-tagger/
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import run_cli
from .tiny_taggers import EXPORT_NEEDS, can_export, save_tiny_tagger
from .tiny_tokenizers import INIT_RANGE, bert_style_tokenizer, gpt2_style_tokenizer, seeded
from .tiny_vlms import build_tiny_florence2, build_tiny_llava

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "models" / "tiny-captioners"
IMAGE_SIZE = 32
PATCH_SIZE = 8


def _vision_config(hidden_size: int = 32) -> dict:
    return {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "initializer_range": INIT_RANGE,
    }


def build_tiny_blip2(seed: int = 0) -> tuple[object, object]:
    """A tiny Blip2ForConditionalGeneration (ViT, Q-Former, OPT) and its Blip2Processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = gpt2_style_tokenizer(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        add_bos_token=True,
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    num_query_tokens = 4
    config = Blip2Config(
        vision_config=_vision_config(),
        qformer_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "vocab_size": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "word_embed_proj_dim": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "init_std": INIT_RANGE,
        },
        num_query_tokens=num_query_tokens,
        # The processor puts one <image> token per query; the model replaces exactly those.
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=INIT_RANGE,
    )
    model = seeded(Blip2ForConditionalGeneration, config, seed)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def build_tiny_blip(seed: int = 0) -> tuple[object, object]:
    """A tiny BlipForConditionalGeneration (ViT and BERT decoder) and its BlipProcessor."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = bert_style_tokenizer()
    config = BlipConfig(
        vision_config=_vision_config(),
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": tokenizer.bos_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "initializer_range": INIT_RANGE,
        },
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=INIT_RANGE,
    )
    model = seeded(BlipForConditionalGeneration, config, seed)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, BlipProcessor(image_processor, tokenizer)


def build_tiny_vit_gpt2(seed: int = 0) -> tuple[object, object]:
    """A tiny VisionEncoderDecoderModel (ViT encoder, GPT-2 decoder), with its image processor and tokenizer."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    tokenizer = gpt2_style_tokenizer(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, add_bos_token=False
    )
    eos = tokenizer.eos_token_id
    encoder = ViTConfig(**_vision_config())
    decoder = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
        initializer_range=INIT_RANGE,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # As in nlpconnect/vit-gpt2-image-captioning: GPT-2 has one special token for start, end and padding.
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = seeded(VisionEncoderDecoderModel, config, seed)
    model.generation_config.update(
        decoder_start_token_id=eos, pad_token_id=eos, eos_token_id=eos, bos_token_id=eos
    )
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, (image_processor, tokenizer)


def _transformers_saver(build: Callable[[int], tuple[object, object]]) -> Callable[[Path, int], None]:
    """A saver for a builder of (model, processor or processors): save_pretrained for each into the folder."""

    def save(folder: Path, seed: int) -> None:
        model, processors = build(seed)
        model.save_pretrained(folder)
        for processor in processors if isinstance(processors, tuple) else (processors,):
            processor.save_pretrained(folder)

    return save


# folder name -> builder of (model, processors), for the transformers models
TINY_CAPTIONERS: dict[str, Callable[[int], tuple[object, object]]] = {
    "blip2": build_tiny_blip2,
    "blip": build_tiny_blip,
    "vit-gpt2": build_tiny_vit_gpt2,
    "florence2": build_tiny_florence2,
    "llava": build_tiny_llava,
}
# folder name -> saver(folder, seed): every tiny model, the tagger included
TINY_SAVERS: dict[str, Callable[[Path, int], None]] = {
    **{kind: _transformers_saver(build) for kind, build in TINY_CAPTIONERS.items()},
    "wd-tagger": save_tiny_tagger,  # exporting needs onnx and onnxscript, optional like onnxruntime
}


def save_tiny_captioner(kind: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Build one tiny captioner and save it in its Hub layout; atomic, so readers never see half of it."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        TINY_SAVERS[kind](tmp, seed)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def save_tiny_captioners(
    output_dir: str | Path, seed: int = 0, kinds: tuple[str, ...] | None = None
) -> dict[str, Path]:
    """Build the tiny captioners (all, or those named) under output_dir/<kind>; return {kind: folder}."""
    return {kind: save_tiny_captioner(kind, Path(output_dir) / kind, seed) for kind in kinds or TINY_SAVERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build tiny random-weight captioning models and a tagger.")
    parser.add_argument(
        "--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="folder that receives one folder per model"
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=list(TINY_SAVERS), default=None, help="which to build (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds or TINY_SAVERS)
    if args.kinds is None and not can_export():  # asked for by name, the tagger says what to install
        print(f"(not building wd-tagger: exporting it needs {' and '.join(EXPORT_NEEDS)})")
        kinds = tuple(kind for kind in kinds if kind != "wd-tagger")
    for path in save_tiny_captioners(args.output_dir, args.seed, kinds).values():
        print(path)


if __name__ == "__main__":
    run_cli(main)
