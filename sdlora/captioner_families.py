"""What every captioning model shares: which family a model is, what each family takes, where its files are.

The family is read from the model's files, never from its name, so a fine-tuned or renamed checkpoint
loads like the original: transformers models by the `model_type` in config.json, booru taggers by the
`model.onnx` + `selected_tags.csv` pair they ship. `trust_remote_code` is never used, so no code from a
model repository runs. This module imports no model code; the family modules load the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import UserError

# Florence-2's captioning task tokens (its processor turns each into the instruction it was trained on).
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_VLM_PROMPT = "Write a one-sentence caption for this image."
TAGGER_FILES = ("model.onnx", "selected_tags.csv")


@dataclass(frozen=True)
class CaptionerFamily:
    """One family's answers to every question the script and the loop ask about it."""

    kind: str  # our name, shown in logs and used as the loader's key
    label: str  # for messages
    prompt: str  # "none", "continues" (text the caption continues) or "instruction" (a chat request)
    default_num_beams: int = 1
    default_prompt: str | None = None
    tasks: tuple[str, ...] = ()  # task tokens it takes (Florence-2)
    generates_text: bool = True  # False: a tagger, which scores a fixed tag list instead
    # VLMs are trained and shipped in bfloat16 (the torch_dtype in the config.json of Qwen2.5-VL, JoyCaption,
    # PaliGemma), whose range float16 lacks; the older captioners keep float16, as they always ran.
    cuda_dtype: str = "float16"
    empty_hint: str = "try other --num_beams or --prompt"  # what to change when a caption comes out empty


FAMILIES = {
    family.kind: family
    for family in (
        CaptionerFamily("blip2", "BLIP-2", "continues", default_num_beams=5),
        CaptionerFamily("blip", "BLIP", "continues", default_num_beams=5),
        CaptionerFamily("vit-gpt2", "ViT-GPT2", "none", default_num_beams=5),
        # num_beams 3: what the Florence-2 model card's example generates with.
        CaptionerFamily(
            "florence2",
            "Florence-2",
            "none",
            default_num_beams=3,
            tasks=FLORENCE_TASKS,
            empty_hint="try another --task or --num_beams",
        ),
        CaptionerFamily(
            "vlm",
            "vision-language model",
            "instruction",
            default_prompt=DEFAULT_VLM_PROMPT,
            cuda_dtype="bfloat16",
        ),
        CaptionerFamily(
            "wd-tagger",
            "booru tagger",
            "none",
            generates_text=False,
            empty_hint="no tag reached its threshold; try a lower --general_threshold",
        ),
    )
}
# config.json model_type -> family, for the families transformers names one way. BLIP-2 covers the OPT and
# Flan-T5 variants. Any other model_type that AutoModelForImageTextToText loads is a "vlm".
MODEL_TYPES = {
    "blip-2": "blip2",
    "blip": "blip",
    "vision-encoder-decoder": "vit-gpt2",
    "florence2": "florence2",
}


@dataclass(frozen=True)
class GenerationSettings:
    """How the text-generating captioners decode; one value object, given to a captioner when it is loaded."""

    prompt: str | None = None  # BLIP-2/BLIP: text the caption continues; VLMs: the instruction
    system_prompt: str | None = None  # VLMs only
    task: str = FLORENCE_TASKS[0]  # Florence-2 only
    num_beams: int = 5
    max_new_tokens: int = 64
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9

    def generate_kwargs(self) -> dict:
        """The keyword arguments of transformers' generate()."""
        kwargs = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


class ImageCaptioner(Protocol):
    """What the captioning loop needs of a loaded model: one caption (or tag list) per image."""

    kind: str

    def caption(self, images: list) -> list[str]: ...

    def describe(self) -> str: ...


def model_file(name_or_path: str, filename: str) -> Path | None:
    """A file of a model, from a local folder or the Hub (its cache when offline); None if the model has none."""
    local = Path(name_or_path)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except HFValidationError:
        raise UserError(f"{name_or_path}: no such folder, and not a Hub model id; check the path") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{name_or_path}: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
            "download it once while online, or pass a local model folder"
        ) from None
    except EntryNotFoundError:  # the repository exists and has no such file
        return None
    except Exception as e:  # unknown id, private repo: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{name_or_path}: cannot read the model's {filename} ({reason}); check the Hub id"
        ) from None


def load_error(name_or_path: str, what: str, error: Exception) -> UserError:
    """The one-line error for a model whose files transformers (or onnxruntime) cannot load."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return UserError(
        f"{name_or_path}: cannot load the {what} ({lines[0] if lines else type(error).__name__})"
    )


def read_model_config(name_or_path: str) -> dict | None:
    """The model's config.json as a dict, or None if it has none."""
    config_file = model_file(name_or_path, "config.json")
    if config_file is None:
        return None
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: not a valid config.json ({e}); re-download the model") from None


def _image_text_to_text_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _refuse_remote_code_florence(name_or_path: str, config: dict) -> None:
    """microsoft/Florence-2-* and most fine-tunes ship their own modelling code, which we never run."""
    if (config.get("vision_config") or {}).get("model_type") == "davit":
        raise UserError(
            f"{name_or_path}: a Florence-2 checkpoint in the original remote-code format, which transformers "
            "cannot load natively; use its converted copy (florence-community/Florence-2-base or -large)"
        )


def captioner_family(name_or_path: str) -> CaptionerFamily:
    """The family of a model, from its files; a UserError naming the supported ones otherwise."""
    config = read_model_config(name_or_path)
    model_type = (config or {}).get("model_type")
    if model_type in MODEL_TYPES:
        if model_type == "florence2":
            _refuse_remote_code_florence(name_or_path, config)
        return FAMILIES[MODEL_TYPES[model_type]]
    if model_type in _image_text_to_text_types():
        return FAMILIES["vlm"]
    # Taggers: SmilingWolf's repositories hold a timm config.json without model_type beside the ONNX model.
    if model_type is None and all(model_file(name_or_path, name) for name in TAGGER_FILES):
        return FAMILIES["wd-tagger"]
    if config is None and Path(name_or_path).is_dir():
        found = "not a captioning model (no config.json, no model.onnx + selected_tags.csv)"
    elif model_type:
        found = f"model_type {model_type!r} is not a captioning model this script runs"
    else:
        found = "a config.json without model_type is not a captioning model this script runs"
    raise UserError(
        f"{name_or_path}: {found}; use a BLIP-2, BLIP, ViT-GPT2, Florence-2 or image-text-to-text model "
        "saved with save_pretrained, a WD tagger folder (model.onnx + selected_tags.csv), or a Hub id"
    )
