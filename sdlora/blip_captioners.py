"""BLIP-2, BLIP and ViT-GPT2: the captioners that write a caption straight from the image (or continue a prompt)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .captioner_families import GenerationSettings, load_error
from .captions import clean_caption


class _NoTextPaddingWarning(logging.Filter):
    """Drops generate's "attention mask is not set" warning, a false alarm for ViT-GPT2.

    GPT-2 pads with its end token (nlpconnect/vit-gpt2-image-captioning does), so transformers warns
    that padded text needs an attention mask; captioning feeds the decoder only its start token, unpadded.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention mask is not set" not in record.getMessage()


_NO_TEXT_PADDING_WARNING = (
    _NoTextPaddingWarning()
)  # one instance: addFilter adds it once however often called


@dataclass
class Captioner:
    """A loaded BLIP-2, BLIP or ViT-GPT2 model and the processors that turn images into its inputs and tokens into text."""

    kind: str  # "blip2", "blip" or "vit-gpt2"
    model: torch.nn.Module
    image_processor: Callable
    tokenizer: Callable
    processor: Callable | None  # BLIP and BLIP-2 pair images with a text prompt in one processor
    device: torch.device
    dtype: torch.dtype
    settings: GenerationSettings = field(default_factory=GenerationSettings)

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}"

    def _inputs(self, images: list):
        if self.processor is None:
            return self.image_processor(images, return_tensors="pt")
        prompt = self.settings.prompt
        text = [prompt] * len(images) if prompt else None
        return self.processor(images=images, text=text, return_tensors="pt")

    def _echoed_tokens(self, inputs) -> int:
        """How many leading output tokens repeat the prompt rather than continue it.

        Decoder-only language models (BLIP-2 with OPT, BLIP's text decoder) return the prompt before
        the new tokens; BLIP drops the prompt's final [SEP] first. Without a prompt the echo is only
        special tokens (<image>, BOS), which decoding skips.
        """
        if "input_ids" not in inputs:
            return 0
        if self.kind == "blip":
            return inputs["input_ids"].shape[1] - 1
        if self.kind == "blip2" and not self.model.config.text_config.is_encoder_decoder:
            return inputs["input_ids"].shape[1]
        return 0

    @torch.inference_mode()
    def caption(self, images: list) -> list[str]:
        """One cleaned caption per PIL image: one line, single spaces, without the prompt."""
        inputs = self._inputs(images).to(self.device, dtype=self.dtype)  # dtype casts floats only
        output = self.model.generate(**inputs, **self.settings.generate_kwargs())  # (B, echoed + new tokens)
        new_tokens = output[:, self._echoed_tokens(inputs) :]
        return [
            clean_caption(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ]


def load_blip_captioner(
    kind: str, name_or_path: str, device: torch.device, dtype: torch.dtype, settings: GenerationSettings
) -> Captioner:
    """Load a BLIP-2, BLIP or ViT-GPT2 model and its processors by folder or Hub id, ready to caption."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipForConditionalGeneration,
        BlipProcessor,
        VisionEncoderDecoderModel,
    )

    try:
        if kind == "vit-gpt2":
            model = VisionEncoderDecoderModel.from_pretrained(name_or_path, dtype=dtype)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            processor = None
            logging.getLogger("transformers.generation.utils").addFilter(_NO_TEXT_PADDING_WARNING)
        else:
            model_class, processor_class = {
                "blip2": (Blip2ForConditionalGeneration, Blip2Processor),
                "blip": (BlipForConditionalGeneration, BlipProcessor),
            }[kind]
            model = model_class.from_pretrained(name_or_path, dtype=dtype)
            processor = processor_class.from_pretrained(name_or_path)
            image_processor, tokenizer = processor.image_processor, processor.tokenizer
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, f"{kind} model or its processor", e) from None
    model.to(device).eval()
    return Captioner(kind, model, image_processor, tokenizer, processor, device, dtype, settings)
