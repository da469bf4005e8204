"""Florence-2 (transformers' native Florence2ForConditionalGeneration): a caption per task token.

`<CAPTION>` gives a short sentence, `<DETAILED_CAPTION>` a few, `<MORE_DETAILED_CAPTION>` a paragraph. The
native classes load the converted checkpoints (`florence-community/Florence-2-base`, `-large`), not the
remote-code originals (`microsoft/Florence-2-*`), which would need trust_remote_code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .captioner_families import GenerationSettings, load_error
from .captions import clean_caption


@dataclass
class FlorenceCaptioner:
    """A loaded Florence-2 model and its processor (which turns the task token into Florence's instruction)."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    settings: GenerationSettings
    kind: str = "florence2"

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}, task {self.settings.task}"

    @torch.inference_mode()
    def caption(self, images: list) -> list[str]:
        """One cleaned caption per PIL image, parsed by the processor's own post-processing for the task."""
        task = self.settings.task
        inputs = self.processor(images=images, text=[task] * len(images), return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # dtype casts pixel_values only
        # An encoder-decoder: the output holds the decoder's start token and the new tokens, no prompt.
        output = self.model.generate(**inputs, **self.settings.generate_kwargs())  # (B, 1 + new tokens)
        pad = self.processor.tokenizer.pad_token_id
        captions = []
        for tokens, image in zip(output, images):
            # Decoded with its special tokens, as post_process_generation expects; the padding of the shorter
            # answers in a batch is dropped first (the pure-text parser removes only <s> and </s>).
            text = self.processor.decode(tokens[tokens != pad], skip_special_tokens=False)
            parsed = self.processor.post_process_generation(text, task=task, image_size=image.size)
            captions.append(clean_caption(parsed[task]))
        return captions


def load_florence_captioner(
    name_or_path: str, device: torch.device, dtype: torch.dtype, settings: GenerationSettings
) -> FlorenceCaptioner:
    """Load a Florence-2 model and its processor by folder or Hub id."""
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    try:
        model = Florence2ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
        processor = Florence2Processor.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, "Florence-2 model or its processor", e) from None
    model.to(device).eval()
    return FlorenceCaptioner(model, processor, device, dtype, settings)
