"""Tokenizers for the tiny captioning models, generated offline: byte-level BPE (GPT-2, OPT, BART, Llama 3)
and WordPiece (BERT, for BLIP), over a small vocabulary of whole words so that random weights still write
word-like captions. Shared by sdlora.tiny_captioners and sdlora.tiny_vlms.
"""

from __future__ import annotations

import torch

from .tiny_model import _bytes_to_unicode

# Whole words in the tiny vocabularies, so that random weights still produce word-like captions.
WORDS = """a an the of on in with and at by to from under over near small big red green blue yellow
orange purple pink black white gray brown dark light bright circle square triangle star line stripes
dots rings shape pattern grid background sky sea sun moon tree house cat dog bird flower mountain road
car boat city photo painting drawing picture portrait landscape sketch simple abstract colorful night
day one two three many some is are top bottom left right middle""".split()

# A larger initialisation than the usual 0.02 lets the image steer the caption: at 0.02 the random
# vision features are so faint that every image gets the same words, which would hide a batch mix-up.
INIT_RANGE = 0.5


def gpt2_style_tokenizer(
    specials: dict[str, str], add_bos_token: bool, tokenizer_class=None, extra_tokens=(), **kwargs
):
    """A byte-level BPE tokenizer like GPT-2's or OPT's, over printable ASCII and WORDS.

    Every token but the space decodes to visible text, so random weights give readable captions; the
    bytes left out (controls, non-ASCII) become the unknown token when a prompt holds them.
    tokenizer_class: GPT2Tokenizer by default; BartTokenizer (Florence-2) takes the same files.
    extra_tokens: special tokens added after the vocabulary (chat headers, image placeholders); kwargs go to
    the tokenizer class (e.g. extra_special_tokens, which names such tokens as attributes).
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
    tokenizer_class = tokenizer_class or GPT2Tokenizer
    tokenizer = tokenizer_class(
        vocab=vocab, merges=list(merges), add_bos_token=add_bos_token, **specials, **kwargs
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
    return tokenizer


def bert_style_tokenizer():
    """A WordPiece tokenizer like BLIP's (BERT uncased, with BLIP's [DEC] start token)."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    tokens += letters + [f"##{c}" for c in letters] + WORDS
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def seeded(model_class, config, seed: int):
    """The model with random weights that depend only on the seed."""
    torch.manual_seed(seed)
    return model_class(config=config).eval()
