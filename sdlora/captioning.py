"""Captioning images with BLIP-2, BLIP or ViT-GPT2, and keeping the captions file up to date while it runs.

The model family is chosen by the `model_type` in the model's config.json, never by its name, so a
fine-tuned or renamed checkpoint loads like the original. Only the transformers classes below are
used; `trust_remote_code` never is, so no code from a model repository runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .captions import (
    clean_caption,
    read_captions_json,
    read_metadata_jsonl,
    read_txt_captions,
    write_captions_json,
    write_metadata_jsonl,
    write_txt_captions,
)
from .devices import pick_device
from .errors import UserError
from .images import InvalidImageError, load_image

# config.json model_type -> our name for the family. BLIP-2 covers the OPT and Flan-T5 variants.
CAPTIONER_KINDS = {"blip-2": "blip2", "blip": "blip", "vision-encoder-decoder": "vit-gpt2"}
PROMPT_KINDS = ("blip2", "blip")  # the families whose processor pairs the image with a text prompt


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


def read_model_config(name_or_path: str) -> dict:
    """The model's config.json, from a local folder or the Hub (its cache when offline)."""
    local = Path(name_or_path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(
                f"{local}: not a captioning model (no config.json); pass a BLIP-2, BLIP or ViT-GPT2 model "
                "folder saved with save_pretrained, or a Hub id"
            )
        config_file = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            config_file = Path(hf_hub_download(name_or_path, "config.json"))
        except HFValidationError:
            raise UserError(
                f"{name_or_path}: no such folder, and not a Hub model id; check the path"
            ) from None
        except LocalEntryNotFoundError:
            raise UserError(
                f"{name_or_path}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
                "download it once while online, or pass a local model folder"
            ) from None
        except Exception as e:  # unknown id, private repo, no config.json: all end the same way for the user
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"{name_or_path}: cannot read the model's config.json ({reason}); check the Hub id"
            ) from None
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: not a valid config.json ({e}); re-download the model") from None


def captioner_kind(name_or_path: str) -> str:
    """The captioner family of a model, from its config; a UserError naming the supported ones otherwise."""
    model_type = read_model_config(name_or_path).get("model_type")
    if model_type not in CAPTIONER_KINDS:
        found = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
        raise UserError(
            f"{name_or_path}: {found} is not a captioning model this script runs; use a "
            "BLIP-2 (blip-2), BLIP (blip) or ViT-GPT2 (vision-encoder-decoder) model"
        )
    return CAPTIONER_KINDS[model_type]


@dataclass
class Captioner:
    """A loaded captioning model and the processors that turn images into its inputs and tokens into text."""

    kind: str  # "blip2", "blip" or "vit-gpt2"
    model: torch.nn.Module
    image_processor: Callable
    tokenizer: Callable
    processor: Callable | None  # BLIP and BLIP-2 pair images with a text prompt in one processor
    device: torch.device
    dtype: torch.dtype

    def _inputs(self, images: list, prompt: str | None):
        if self.processor is None:
            return self.image_processor(images, return_tensors="pt")
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
    def caption(
        self,
        images: list,
        prompt: str | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 64,
        min_new_tokens: int = 1,
    ) -> list[str]:
        """One cleaned caption per PIL image: one line, single spaces, without the prompt."""
        inputs = self._inputs(images, prompt).to(self.device, dtype=self.dtype)  # dtype casts floats only
        output = self.model.generate(
            **inputs,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )  # (B, echoed + new tokens)
        new_tokens = output[:, self._echoed_tokens(inputs) :]
        return [
            clean_caption(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        ]


def load_captioner(name_or_path: str, device: str = "auto", dtype: str = "auto") -> Captioner:
    """Load a BLIP-2, BLIP or ViT-GPT2 model and its processors by folder or Hub id, ready to caption."""
    kind = captioner_kind(name_or_path)
    torch_device, torch_dtype = pick_device(device, dtype)
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
            model = VisionEncoderDecoderModel.from_pretrained(name_or_path, dtype=torch_dtype)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            processor = None
            logging.getLogger("transformers.generation.utils").addFilter(_NO_TEXT_PADDING_WARNING)
        else:
            model_class, processor_class = {
                "blip2": (Blip2ForConditionalGeneration, Blip2Processor),
                "blip": (BlipForConditionalGeneration, BlipProcessor),
            }[kind]
            model = model_class.from_pretrained(name_or_path, dtype=torch_dtype)
            processor = processor_class.from_pretrained(name_or_path)
            image_processor, tokenizer = processor.image_processor, processor.tokenizer
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{name_or_path}: cannot load the {kind} model or its processor ({reason})") from None
    model.to(torch_device).eval()
    return Captioner(kind, model, image_processor, tokenizer, processor, torch_device, torch_dtype)


def add_trigger_words(caption: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + caption + suffix, joined by single spaces; e.g. prefix 'sks dog,' -> 'sks dog, a dog on a sofa'."""
    return " ".join(part for part in (clean_caption(prefix), caption, clean_caption(suffix)) if part)


@dataclass
class CaptionOutput:
    """The captions file being written: the captions it already holds, and those not saved yet.

    json: one image_captions.json; jsonl: an imagefolder metadata.jsonl; txt: a .txt file beside each image.
    Keys of `captions` are resolved paths, so the same image named two ways is one entry.
    """

    format: str
    path: Path | None  # the file, or None for txt
    images_dir: Path
    captions: dict[Path, str] = field(default_factory=dict)
    unsaved: dict[Path, str] = field(default_factory=dict)

    def describe(self) -> str:
        return str(self.path) if self.path else f".txt files beside the images in {self.images_dir}"

    def has(self, image: Path) -> bool:
        return image.resolve() in self.captions

    def add(self, image: Path, caption: str) -> None:
        self.captions[image.resolve()] = caption
        self.unsaved[image] = caption

    def save(self) -> None:
        """Write atomically (temporary file, then rename): a crash leaves the old file or the new one."""
        if not self.unsaved:
            return
        if self.format == "json":
            write_captions_json(self.path, self.captions)
        elif self.format == "jsonl":
            write_metadata_jsonl(self.path, self.captions)
        else:
            write_txt_captions(self.unsaved)
        self.unsaved.clear()


def _refuse_extra_columns(path: Path) -> None:
    """metadata.jsonl is rewritten with file_name and text only; refuse one with more, instead of dropping them."""
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        extra = sorted(set(json.loads(line)) - {"file_name", "text"}) if line.strip() else []
        if extra:
            raise UserError(
                f"{path}: line {lineno} has columns besides file_name and text ({', '.join(extra)}) that "
                "rewriting it would drop; pass another --output_file"
            )


def open_caption_output(fmt: str, images_dir: str | Path, output_file: str | Path | None) -> CaptionOutput:
    """The output for a format, with the captions already there; a malformed file is a UserError, untouched."""
    images_dir = Path(images_dir)
    if fmt == "txt":
        existing = read_txt_captions(images_dir)
        path = None
    else:
        default = "image_captions.json" if fmt == "json" else images_dir / "metadata.jsonl"
        path = Path(output_file or default)
        if path.is_dir():
            raise UserError(f"--output_file {path}: is a folder; name a file")
        existing = {}
        if path.exists():
            existing = read_captions_json(path) if fmt == "json" else read_metadata_jsonl(path)
            if fmt == "jsonl":
                _refuse_extra_columns(path)
    captions = {image.resolve(): text for image, text in existing.items()}
    return CaptionOutput(fmt, path, images_dir, captions)


@dataclass
class CaptionRun:
    """What a captioning run did: for the summary and the tests."""

    generated: int = 0  # images the model captioned, in this run
    written: int = 0  # captions added to the output (the rest were empty)
    seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)  # one message per image, naming it
    empty: list[Path] = field(default_factory=list)  # images the model gave no words for

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_batch(paths: list[Path], background: tuple[int, int, int]) -> tuple[list[Path], list, list[str]]:
    """Load images through the one image loader: (paths loaded, their RGB images, messages for the rest)."""
    loaded, images, unreadable = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, background=background).image)
            loaded.append(path)
        except InvalidImageError as e:
            unreadable.append(str(e))
    return loaded, images, unreadable


def caption_images(
    captioner: Captioner,
    paths: list[Path],
    output: CaptionOutput,
    *,
    batch_size: int = 8,
    save_every: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
    prefix: str = "",
    suffix: str = "",
    progress: Callable[[int], object] | None = None,
    **generate: object,
) -> CaptionRun:
    """Caption paths batch by batch into output, saving every save_every batches and on any exit.

    Unreadable images are listed in the result and skipped. The next batch's images are decoded in a
    background thread while the model captions the current one. `generate` goes to Captioner.caption.
    """
    run = CaptionRun()
    start = time.perf_counter()
    batches = list(batched(paths, batch_size))
    try:
        with ThreadPoolExecutor(max_workers=1) as loader:
            upcoming = loader.submit(load_batch, batches[0], background) if batches else None
            for number, batch in enumerate(batches, start=1):
                loaded, images, unreadable = upcoming.result()
                if number < len(batches):
                    upcoming = loader.submit(load_batch, batches[number], background)
                run.unreadable += unreadable
                captions = captioner.caption(images, **generate) if images else []
                for path, caption in zip(loaded, captions):
                    if caption:
                        output.add(path, add_trigger_words(caption, prefix, suffix))
                        run.written += 1
                    else:
                        run.empty.append(path)
                run.generated += len(loaded)
                if number % save_every == 0:
                    output.save()
                if progress:
                    progress(len(batch))
    finally:
        output.save()  # Ctrl-C or a crash: keep every caption made so far
        run.seconds = time.perf_counter() - start
    return run
