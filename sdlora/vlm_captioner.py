"""Vision-language models asked for a caption through their chat template (Qwen2.5-VL, Qwen3-VL, LLaVA and
JoyCaption, PaliGemma, ...): anything transformers' AutoModelForImageTextToText loads.

The instruction (--prompt) goes into one user turn with the image; the answer is what the model writes after
the template's assistant header, cleaned of chat formatting. Prompts in a batch are padded on the LEFT, so
every answer starts right after its own prompt: a decoder-only model continues the last column, and with
right padding the shorter prompts would be continued after their padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .captioner_families import DEFAULT_VLM_PROMPT, GenerationSettings, load_error
from .captions import clean_caption
from .errors import UserError

# What chat models put around an answer that a training caption must not keep: a role name they repeat
# ("assistant:", Gemma's "model"), a label ("Caption:"), and quotes around the whole answer.
_ROLE = re.compile(r"^\s*(?:assistant|model)\s*(?::|\n)\s*", re.IGNORECASE)
_LABEL = re.compile(r"^(?:caption|description)\s*:\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def clean_answer(text: str) -> str:
    """A chat answer as a caption: no role name or label in front, no quotes around it, one line."""
    text = clean_caption(_ROLE.sub("", text))
    text = _LABEL.sub("", text)
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def render_prompt(processor, instruction: str, system_prompt: str | None = None) -> str:
    """The model's chat template applied to one user turn holding the image and the instruction.

    Multimodal templates (Qwen-VL, llava-hf) place the image where the content list has {"type": "image"};
    a template that renders only plain-string content (JoyCaption's model card passes a string) is given
    the instruction as one and must place the image itself. A processor without a template (PaliGemma,
    which expects prompts like "caption en") gets the instruction as it is.
    """
    if getattr(processor, "chat_template", None) is None:
        return instruction
    image_token = getattr(processor, "image_token", None)
    image_token = None if image_token is None else str(image_token)  # some processors hold an AddedToken
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    contents = ([{"type": "image"}, {"type": "text", "text": instruction}], instruction)
    for content in contents:
        messages = [*system, {"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if image_token is None or image_token in text:
            return text
    raise UserError(
        f"its chat template puts no image in the prompt (no {image_token!r} in it); it cannot caption here"
    )


@dataclass
class ChatCaptioner:
    """A loaded vision-language model, its processor, and the chat prompt every image is asked with."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    settings: GenerationSettings
    prompt: str  # the rendered chat prompt
    kind: str = "vlm"

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}, prompt {self.settings.prompt!r}"

    @torch.inference_mode()
    def answer(self, images: list, prompts: list[str]) -> list[str]:
        """The cleaned answer to each (image, rendered prompt) pair, generated as one batch."""
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.dtype)  # dtype casts pixel_values only
        output = self.model.generate(**inputs, **self.settings.generate_kwargs())  # (B, prompt + new tokens)
        # Left padding: every prompt ends at the same column, so the answers all start after it.
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [clean_answer(text) for text in texts]

    def caption(self, images: list) -> list[str]:
        """One caption per PIL image: the answer to the instruction."""
        return self.answer(images, [self.prompt] * len(images))


def load_chat_captioner(
    name_or_path: str, device: torch.device, dtype: torch.dtype, settings: GenerationSettings
) -> ChatCaptioner:
    """Load an image-text-to-text model and its processor, set up for batched captioning."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError) as e:  # ImportError: Qwen-VL's processors need torchvision
        raise load_error(name_or_path, "vision-language model or its processor", e) from None
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; a batch needs one (masked out)
        tokenizer.pad_token = tokenizer.eos_token
    settings = replace(settings, prompt=settings.prompt or DEFAULT_VLM_PROMPT)
    try:
        prompt = render_prompt(processor, settings.prompt, settings.system_prompt)
    except UserError as e:
        raise UserError(f"{name_or_path}: {e}") from None
    model.to(device).eval()
    return ChatCaptioner(model, processor, device, dtype, settings, prompt)
