"""Tiny captioning models with random weights: BLIP-2, BLIP and ViT-GPT2, built offline from configs.

No weights can be downloaded where this project is developed and tested, so the captioning tests and
benchmark build their own models: the same classes, processors and folder layout as
`Salesforce/blip2-opt-2.7b`, `Salesforce/blip-image-captioning-large` and
`nlpconnect/vit-gpt2-image-captioning`, with tokenizers generated here, small enough that captioning
a batch takes milliseconds on 2 CPU cores. Their captions are random words.

    python -m sdlora.tiny_captioners --output_dir models/tiny-captioners   # builds blip2/, blip/, vit-gpt2/
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .tiny_model import _bytes_to_unicode

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "models" / "tiny-captioners"
IMAGE_SIZE = 32
PATCH_SIZE = 8

# Whole words in the tiny vocabularies, so that random weights still produce word-like captions.
WORDS = """a an the of on in with and at by to from under over near small big red green blue yellow
orange purple pink black white gray brown dark light bright circle square triangle star line stripes
dots rings shape pattern grid background sky sea sun moon tree house cat dog bird flower mountain road
car boat city photo painting drawing picture portrait landscape sketch simple abstract colorful night
day one two three many some is are top bottom left right middle""".split()

# A larger initialisation than the usual 0.02 lets the image steer the caption: at 0.02 the random
# vision features are so faint that every image gets the same words, which would hide a batch mix-up.
INIT_RANGE = 0.5


def _gpt2_style_tokenizer(specials: dict[str, str], add_bos_token: bool):
    """A byte-level BPE tokenizer like GPT-2's or OPT's, over printable ASCII and WORDS.

    Every token but the space decodes to visible text, so random weights give readable captions; the
    bytes left out (controls, non-ASCII) become the unknown token when a prompt holds them.
    """
    from transformers import GPT2Tokenizer

    byte_chars = _bytes_to_unicode()
    alphabet = [byte_chars[b] for b in range(ord("!"), ord("~") + 1)]
    space = byte_chars[ord(" ")]
    vocab: dict[str, int] = {}
    for token in list(dict.fromkeys(specials.values())):
        vocab.setdefault(token, len(vocab))
    for char in [space, *alphabet]:
        vocab.setdefault(char, len(vocab))
    merges: dict[tuple[str, str], None] = {}  # ordered set: the merge rules in priority order
    for word in WORDS:
        for form in (word, space + word):
            merged = form[0]
            for char in form[1:]:
                merges[(merged, char)] = None
                merged += char
                vocab.setdefault(merged, len(vocab))
    return GPT2Tokenizer(vocab=vocab, merges=list(merges), add_bos_token=add_bos_token, **specials)


def _bert_style_tokenizer():
    """A WordPiece tokenizer like BLIP's (BERT uncased, with BLIP's [DEC] start token)."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    tokens += letters + [f"##{c}" for c in letters] + WORDS
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


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


def _seeded(model_class, config, seed: int):
    """The model with random weights that depend only on the seed."""
    torch.manual_seed(seed)
    return model_class(config=config).eval()


def build_tiny_blip2(seed: int = 0) -> tuple[object, object]:
    """A tiny Blip2ForConditionalGeneration (ViT, Q-Former, OPT) and its Blip2Processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tokenizer = _gpt2_style_tokenizer(
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
    model = _seeded(Blip2ForConditionalGeneration, config, seed)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def build_tiny_blip(seed: int = 0) -> tuple[object, object]:
    """A tiny BlipForConditionalGeneration (ViT and BERT decoder) and its BlipProcessor."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    tokenizer = _bert_style_tokenizer()
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
    model = _seeded(BlipForConditionalGeneration, config, seed)
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

    tokenizer = _gpt2_style_tokenizer(
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
    model = _seeded(VisionEncoderDecoderModel, config, seed)
    model.generation_config.update(
        decoder_start_token_id=eos, pad_token_id=eos, eos_token_id=eos, bos_token_id=eos
    )
    image_processor = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, (image_processor, tokenizer)


TINY_CAPTIONERS: dict[str, Callable[[int], tuple[object, object]]] = {
    "blip2": build_tiny_blip2,
    "blip": build_tiny_blip,
    "vit-gpt2": build_tiny_vit_gpt2,
}


def save_tiny_captioner(kind: str, output_dir: str | Path, seed: int = 0) -> Path:
    """Build one tiny captioner and save it in the Hugging Face layout; atomic, so readers never see half of it."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model, processors = TINY_CAPTIONERS[kind](seed)
        model.save_pretrained(tmp)
        for processor in processors if isinstance(processors, tuple) else (processors,):
            processor.save_pretrained(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def save_tiny_captioners(output_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build all three tiny captioners under output_dir/<kind>; return {kind: folder}."""
    return {kind: save_tiny_captioner(kind, Path(output_dir) / kind, seed) for kind in TINY_CAPTIONERS}


def main() -> None:
    parser = argparse.ArgumentParser(description="Build tiny BLIP-2, BLIP and ViT-GPT2 captioning models.")
    parser.add_argument(
        "--output_dir", default=str(DEFAULT_OUTPUT_DIR), help="folder that receives blip2/, blip/, vit-gpt2/"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args()
    for path in save_tiny_captioners(args.output_dir, args.seed).values():
        print(path)


if __name__ == "__main__":
    main()
