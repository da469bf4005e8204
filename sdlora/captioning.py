"""Captioning a folder of images: loading any supported captioner, and the loop that keeps the captions file
up to date while it runs.

Families (sdlora.captioner_families decides which a model is): BLIP-2, BLIP and ViT-GPT2
(sdlora.blip_captioners), Florence-2 (sdlora.florence_captioner), vision-language models through their chat
template (sdlora.vlm_captioner) and WD booru taggers in ONNX (sdlora.taggers). A sentence and tags combine
into "sentence, tag, tag" (a second model, or tags read from another captioner's file).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .blip_captioners import load_blip_captioner
from .caption_output import CaptionOutput
from .captioner_families import CaptionerFamily, GenerationSettings, ImageCaptioner, captioner_family
from .captions import clean_caption
from .devices import pick_device
from .florence_captioner import load_florence_captioner
from .images import InvalidImageError, load_image
from .taggers import TagSettings, load_tagger
from .vlm_captioner import load_chat_captioner

# family kind -> loader(name_or_path, device, dtype, settings), for the families that generate text.
TEXT_LOADERS: dict[str, Callable[..., ImageCaptioner]] = {
    "blip2": partial(load_blip_captioner, "blip2"),
    "blip": partial(load_blip_captioner, "blip"),
    "vit-gpt2": partial(load_blip_captioner, "vit-gpt2"),
    "florence2": load_florence_captioner,
    "vlm": load_chat_captioner,
}


def _pick_device(family: CaptionerFamily, device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """pick_device, with the family's own dtype on CUDA for --dtype auto (bfloat16 for VLMs where supported)."""
    if dtype == "auto" and family.cuda_dtype == "bfloat16":
        torch_device, _ = pick_device(device, "auto")
        if torch_device.type == "cuda" and torch.cuda.is_bf16_supported():
            dtype = "bfloat16"
    return pick_device(device, dtype)


def load_captioner(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    generation: GenerationSettings | None = None,
    tagging: TagSettings | None = None,
) -> ImageCaptioner:
    """Load any supported captioner or tagger by folder or Hub id, its family read from its files.

    generation applies to the text generators (default: greedy or the family's beam width), tagging to taggers.
    """
    family = captioner_family(name_or_path)
    if not family.generates_text:
        return load_tagger(name_or_path, device, tagging)
    torch_device, torch_dtype = _pick_device(family, device, dtype)
    settings = generation or GenerationSettings(num_beams=family.default_num_beams)
    return TEXT_LOADERS[family.kind](name_or_path, torch_device, torch_dtype, settings)


def add_trigger_words(caption: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + caption + suffix, joined by single spaces; e.g. prefix 'sks dog,' -> 'sks dog, a dog on a sofa'."""
    return " ".join(part for part in (clean_caption(prefix), caption, clean_caption(suffix)) if part)


def join_tags(sentence: str, tags: str, separator: str = ", ") -> str:
    """'sentence, tag, tag', as kohya users combine them; the sentence's final full stop goes so the tags continue it."""
    if tags and sentence.endswith(".") and not sentence.endswith(".."):
        sentence = sentence[:-1]
    return separator.join(part for part in (sentence, tags) if part)


@dataclass
class TaggedCaptioner:
    """A captioner's sentence followed by a tagger's tags, for each image: both models run on every batch."""

    captioner: ImageCaptioner
    tagger: ImageCaptioner
    separator: str = ", "

    @property
    def kind(self) -> str:
        return f"{self.captioner.kind} + {self.tagger.kind}"

    def describe(self) -> str:
        return f"{self.captioner.describe()}; tagger on {self.tagger.describe()}"

    def caption(self, images: list) -> list[str]:
        sentences, tags = self.captioner.caption(images), self.tagger.caption(images)
        return [join_tags(sentence, tag, self.separator) for sentence, tag in zip(sentences, tags)]


@dataclass(frozen=True)
class CaptionText:
    """What goes around each generated caption: tags read from another captioner's file, and trigger words."""

    prefix: str = ""
    suffix: str = ""
    tags: Mapping[Path, str] | None = None  # by resolved image path (caption_output.read_caption_file)
    separator: str = ", "

    def with_tags(self, image: Path, caption: str) -> str:
        return (
            join_tags(caption, self.tags.get(image.resolve(), ""), self.separator) if self.tags else caption
        )

    def with_trigger_words(self, caption: str) -> str:
        return add_trigger_words(caption, self.prefix, self.suffix)


@dataclass
class CaptionRun:
    """What a captioning run did: for the summary and the tests."""

    generated: int = 0  # images the model captioned, in this run
    written: int = 0  # captions added to the output (the rest were empty)
    seconds: float = 0.0
    unreadable: list[str] = field(default_factory=list)  # one message per image, naming it
    empty: list[Path] = field(default_factory=list)  # images the model gave no words for
    untagged: list[Path] = field(default_factory=list)  # images the --append_tags_from file has no tags for

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


def _add_captions(
    output: CaptionOutput, run: CaptionRun, text: CaptionText, paths: list, captions: list
) -> None:
    for path, caption in zip(paths, captions):
        if text.tags is not None and path.resolve() not in text.tags:
            run.untagged.append(path)
        caption = text.with_tags(path, caption)
        if caption:
            output.add(path, text.with_trigger_words(caption))
            run.written += 1
        else:
            run.empty.append(path)
    run.generated += len(paths)


def caption_images(
    captioner: ImageCaptioner,
    paths: list[Path],
    output: CaptionOutput,
    *,
    batch_size: int = 8,
    save_every: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
    text: CaptionText = CaptionText(),
    progress: Callable[[int], object] | None = None,
) -> CaptionRun:
    """Caption paths batch by batch into output, saving every save_every batches and on any exit.

    Unreadable images are listed in the result and skipped. The next batch's images are decoded in a
    background thread while the model captions the current one.
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
                _add_captions(output, run, text, loaded, captioner.caption(images) if images else [])
                if number % save_every == 0:
                    output.save()
                if progress:
                    progress(len(batch))
    finally:
        output.save()  # Ctrl-C or a crash: keep every caption made so far
        run.seconds = time.perf_counter() - start
    return run
