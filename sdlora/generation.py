"""Image generation shared by training-time validation, the inference notebook and `python -m sdlora.generate`."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .devices import pick_device
from .errors import UserError
from .families import family_of_pipeline
from .lora_files import LoadedLora, find_lora_file, load_lora, read_lora_file
from .models import resolve_model
from .prompts import Prompt, is_prompt_file, parse_line, read_prompt_file

logger = logging.getLogger(__name__)


def slugify(prompt: str, max_len: int = 60) -> str:
    """A folder-safe name for a prompt: lowercase words joined by dashes."""
    slug = re.sub(r"[^\w]+", "-", prompt.lower(), flags=re.UNICODE).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def generate(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    num_images: int = 1,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    lora_scale: float | None = None,
) -> list[Image.Image]:
    """Images for one prompt; image i uses seed + i on a CPU generator, so results match across devices."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    kwargs = family_of_pipeline(pipe).lora_scale_kwargs(lora_scale) if lora_scale is not None else {}
    with torch.no_grad():
        return pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            **kwargs,
        ).images


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side in rows of `columns` (all in one row by default)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_images(images: list[Image.Image], folder: Path, stem: str = "image") -> list[Path]:
    """Save as <stem>_<i>.png, numbering on from existing files so earlier results are never overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(1))
        for p in folder.glob(f"{stem}_*.png")
        if (m := re.fullmatch(rf"{re.escape(stem)}_(\d+)\.png", p.name))
    ]
    start = max(taken) + 1 if taken else 0
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_{start + i}.png"
        image.save(path)
        paths.append(path)
    return paths


# --- Inference: shared by inference.ipynb and `python -m sdlora.generate` ---------------------------

GENERATIONS_LOG = "generations.jsonl"


def read_prompts(prompts: str | Path | list) -> list[Prompt]:
    """Prompts from strings and/or prompts files (one prompt per line, JSON or TOML; a .txt, .json or .toml
    name must be a file), each with its own settings where it gives them (kohya's --n --w --h --d --l --s)."""
    items = [prompts] if isinstance(prompts, (str, Path, Prompt)) else list(prompts)
    found: list[Prompt] = []
    for item in items:
        if isinstance(item, Prompt):
            found.append(item)
        elif is_prompt_file(str(item)):
            found.extend(read_prompt_file(str(item)))
        elif str(item).strip():
            found.append(parse_line(str(item)))
    if not found:
        raise UserError("no prompts given; pass one or more prompts or a prompts file")
    return found


def check_generation_settings(
    num_images: int, num_inference_steps: int, height: int | None, width: int | None
) -> None:
    """UserError for settings the pipeline would reject only after the model has loaded."""
    if num_images < 1:
        raise UserError(f"num_images {num_images}: must be at least 1")
    if num_inference_steps < 1:
        raise UserError(f"num_inference_steps {num_inference_steps}: must be at least 1")
    for name, size in (("height", height), ("width", width)):
        # The VAE downsamples by 8: the UNet works on (H/8, W/8) latents.
        if size is not None and (size < 8 or size % 8):
            raise UserError(
                f"{name} {size}: must be a positive multiple of 8 (or None for the model's native size)"
            )


def inference_scheduler(
    model: str,
    prediction_type: str | None = None,
    revision: str | None = None,
    zero_terminal_snr: bool = False,
):
    """The model's own inference scheduler (class from model_index.json), sampling `prediction_type`
    when given: a v-prediction LoRA on an epsilon model must be sampled as v-prediction. A LoRA trained with
    zero terminal SNR samples with the same rescaled betas and trailing timesteps (Lin et al. 2023,
    arXiv 2305.08891, section 3.3), with DDIM where the model's scheduler has no such option (PNDM)."""
    import inspect

    import diffusers

    from .modelfiles import read_model_config

    _, class_name = read_model_config(model, "model_index.json", revision)["scheduler"]
    scheduler_class = getattr(diffusers, class_name)
    scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler", revision=revision)
    changes = {}
    # (a flow-matching scheduler, SD 3.5's, has no prediction type: its model predicts a velocity)
    if prediction_type and scheduler.config.get("prediction_type", prediction_type) != prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
            scheduler_class = diffusers.DDIMScheduler
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler_class.from_config(scheduler.config, **changes) if changes else scheduler


def lora_prediction_type(path: Path) -> str | None:
    """The prediction type a LoRA was trained for, from its header (SAI model spec: "epsilon" or "v")."""
    from .lora_files import read_header

    return {"epsilon": "epsilon", "v": "v_prediction"}.get(read_header(path).get("modelspec.prediction_type"))


def lora_zero_terminal_snr(path: Path) -> bool:
    """Whether a LoRA was trained with zero terminal SNR (kohya's ss_zero_terminal_snr header key)."""
    from .lora_files import read_header

    return read_header(path).get("ss_zero_terminal_snr") == "True"


def lora_base_model(path: Path) -> str | None:
    """The base model a LoRA was trained on (kohya's ss_sd_model_name), where it can be loaded from here: a
    folder that exists, or a Hub id (owner/name). Other trainers write checkpoint file names there."""
    from .lora_files import read_header

    name = read_header(path).get("ss_sd_model_name") or ""
    if name and Path(name).is_dir():
        return name
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith((".safetensors", ".ckpt", ".pt"))
    return name if hub_id and not Path(name).exists() else None


def load_pipeline(
    base_model: str | None,
    lora_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """The base model's pipeline (of its family: SD 1.x/2.x or SDXL) on `device`, with the LoRA at
    lora_path loaded if given, sampling with the prediction type the LoRA was trained for.

    Returns (pipe, lora): lora is a lora_files.LoadedLora, or None without lora_path. The LoRA file is
    read and checked before the model loads, so a wrong path fails in a second, not after a download.
    """
    from .families import detect_family

    lora_file = read_lora_file(find_lora_file(lora_path)) if lora_path else None
    if base_model is None and lora_file and (trained_on := lora_base_model(lora_file.path)):
        logger.info(
            "base model: %s, which the LoRA was trained on (pass --base_model for another)", trained_on
        )
        base_model = trained_on
    model = resolve_model(base_model)
    device, dtype = pick_device(device, dtype)
    try:
        family = detect_family(model, revision)
        pipe = family.pipeline_class.from_pretrained(
            model, dtype=dtype, revision=revision, variant=variant, **family.pipeline_kwargs
        )
    except (
        OSError,
        ValueError,
        UserError,
    ) as e:  # ValueError: a missing local path is taken for a bad Hub id
        if Path(model).is_absolute() or model.startswith((".", "~")):
            raise UserError(f"{model}: no such model folder; check the path") from None
        raise UserError(
            f"{model}: cannot load the model ({str(e).splitlines()[0]}); check the id or path"
        ) from None
    lora = load_lora(pipe, lora_file.path, lora_file) if lora_file else None
    if lora_file:
        prediction_type, zero_snr = (
            lora_prediction_type(lora_file.path),
            lora_zero_terminal_snr(lora_file.path),
        )
        if prediction_type or zero_snr:
            pipe.scheduler = inference_scheduler(model, prediction_type, revision, zero_snr)
    pipe.set_progress_bar_config(disable=True)
    if (
        pipe.dtype != dtype
    ):  # diffusers before the torch_dtype -> dtype rename ignore `dtype` (with a warning)
        pipe.to(dtype=dtype)
    return pipe.to(device), lora


@dataclass
class Generated:
    prompt: str
    images: list[Image.Image]
    paths: list[Path]


def generate_at_scales(pipe, prompt: str, scales: list[float], seed: int = 0, **kwargs) -> list[Image.Image]:
    """One image per LoRA scale, all from the same prompt and seed (scale 0 is the base model alone)."""
    return [generate(pipe, prompt, num_images=1, seed=seed, lora_scale=s, **kwargs)[0] for s in scales]


def generate_and_save(
    pipe,
    prompts: list[str],
    output_dir: str | Path,
    negative_prompt: str | None = None,
    num_images: int = 4,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    lora: LoadedLora | None = None,
    lora_scale: float = 1.0,
) -> list[Generated]:
    """Generate num_images per prompt into <output_dir>/<prompt-slug>/image_<i>.png, never overwriting.

    `lora` (from load_pipeline) turns lora_scale on; each prompt's settings are appended as one JSON
    line to <output_dir>/generations.jsonl, so every image can be traced to its LoRA, scale and seed.
    """
    check_generation_settings(num_images, num_inference_steps, height, width)
    output_dir = Path(output_dir)
    settings = {
        "negative_prompt": negative_prompt or None,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
    }
    results = []
    for prompt in read_prompts(prompts):  # strings too; a prompt's own settings override these
        own = {**settings, "seed": seed, **prompt.settings()}
        images = generate(
            pipe,
            prompt.text,
            num_images=num_images,
            lora_scale=lora_scale if lora else None,
            **own,
        )
        paths = save_images(images, output_dir / slugify(prompt.text))
        record = {
            "prompt": prompt.text,
            "files": [p.relative_to(output_dir).as_posix() for p in paths],
            "seeds": [own["seed"] + i for i in range(num_images)],
            "base_model": pipe.name_or_path,
            "lora": str(lora.path) if lora else None,
            "lora_format": lora.format if lora else None,
            "lora_scale": lora_scale if lora else None,
            **{k: v for k, v in own.items() if k != "seed"},
            "size": list(images[0].size),
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."),
        }
        with open(output_dir / GENERATIONS_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        results.append(Generated(prompt.text, images, paths))
    return results
