"""Held-out validation loss: the split, the fixed probes, the deterministic loss, the best LoRA and early stopping.

Every random choice here is a pure function of (seed, purpose, ...), like training's streams: the split is
stream 3, the training probe sample stream 4, the probe noise stream 5 (per example and timestep). So a
resumed run holds out the same images and scores them with the same noise, and two evaluations of the same
weights give the same numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .fileio import atomic_directory, atomic_file, atomic_write_text
from .training import noised

SPLIT_STREAM, TRAIN_PROBE_STREAM, NOISE_STREAM = 3, 4, 5
MAX_TRAIN_PROBES = 16  # enough to show the train/held-out gap; each costs a forward per probe timestep
BEST_DIR, BEST_STEP_FILE = "best", "step.json"
CSV_FILE = "validation_loss.csv"


def split_examples(n: int, split: str, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices), both sorted: --validation_split as a fraction of n ("0.1",
    rounded half up, at least 1) or a count ("8"), chosen by a permutation of the seed's own stream."""
    held = _held_out_count(n, split)
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    return sorted(int(i) for i in order[held:]), sorted(int(i) for i in order[:held])


def _held_out_count(n: int, split: str) -> int:
    text = str(split).strip()
    try:
        count = int(text)
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction < 1.0:  # also false for nan
            raise UserError(
                f"--validation_split {split!r}: use a fraction between 0 and 1 (e.g. 0.1) or a positive count of images (e.g. 8)"
            ) from None
        count = max(1, math.floor(n * fraction + 0.5))
    else:
        if count < 1:
            raise UserError(
                f"--validation_split {split!r}: use a positive count of images (e.g. 8) or a fraction between 0 and 1 (e.g. 0.1)"
            )
    if count >= n:
        raise UserError(
            f"--validation_split {split!r} holds out {count} of {n} images and leaves none to train on; "
            "pass a smaller fraction or count, add images, or drop --validation_split"
        )
    return count


def train_probe_indices(train: Sequence[int], k: int, seed: int) -> list[int]:
    """A fixed sample of k training indices (at most len(train)), sorted: the training images whose
    fixed-noise loss is logged beside the held-out one. The caller picks k, usually
    min(len(held out), len(train), MAX_TRAIN_PROBES), so both losses average over as many images."""
    k = min(k, len(train))
    chosen = np.random.default_rng([seed, TRAIN_PROBE_STREAM]).choice(len(train), size=k, replace=False)
    return sorted(int(train[i]) for i in chosen)


def probe_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """`count` timesteps evenly spaced over [0, num_train_timesteps), each at the centre of its interval
    (8 of 1000: 62, 187, ..., 937), so that the curve covers fine detail and global structure alike."""
    if not 1 <= count <= num_train_timesteps:
        raise UserError(f"--validation_loss_timesteps {count}: use a count from 1 to {num_train_timesteps}")
    return [((2 * i + 1) * num_train_timesteps) // (2 * count) for i in range(count)]


def probe_noise(seed: int, index: int, timestep: int, shape: Sequence[int]) -> torch.Tensor:
    """The fixed fp32 CPU noise of one example at one probe timestep, from a generator of its own: the
    global RNG and the training streams are never touched, and CPU and GPU runs score the same noise."""
    state = int(
        np.random.SeedSequence([seed, NOISE_STREAM, index, timestep]).generate_state(1, dtype=np.uint64)[0]
        >> 1
    )
    generator = torch.Generator(device="cpu").manual_seed(state)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


@dataclass
class ProbeExample:
    """One scored image: its dataset index (which keys its noise), its deterministic latent and its UNet
    conditioning as per-example tensors without a batch dimension."""

    index: int
    latents: torch.Tensor  # (C, h, w) fp32, e.g. LatentCache.mean(index, flip=False)
    unet_inputs: dict  # e.g. {"encoder_hidden_states": (77, D)}, SDXL adds {"added_cond_kwargs": {...}}


def split_inputs(inputs: dict) -> list[dict]:
    """A batched UNet-input dict (as Family.unet_inputs returns) as one dict per example: the inverse of
    collate_inputs, for building ProbeExamples from a batched text-encoder call."""
    sizes = {len(v) for v in _leaves(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"inputs of different batch sizes: {sorted(sizes)}")
    return [_select(inputs, i) for i in range(sizes.pop())]


def _leaves(inputs: dict) -> list[torch.Tensor]:
    out = []
    for value in inputs.values():
        if isinstance(value, dict):
            out.extend(_leaves(value))
        elif value is not None:
            out.append(value)
    return out


def _select(inputs: dict, i: int) -> dict:
    return {
        k: _select(v, i) if isinstance(v, dict) else (None if v is None else v[i]) for k, v in inputs.items()
    }


def collate_inputs(inputs: list[dict], device, dtype: torch.dtype) -> dict:
    """Stack per-example UNet inputs (nested dicts of tensors) into a batch on `device`; floating tensors
    are cast to `dtype`, the UNet's."""
    first = inputs[0]
    batch = {}
    for key, value in first.items():
        if isinstance(value, dict):
            batch[key] = collate_inputs([x[key] for x in inputs], device, dtype)
        elif value is None:
            batch[key] = None
        else:
            stacked = torch.stack([x[key] for x in inputs])
            batch[key] = stacked.to(device, dtype if stacked.is_floating_point() else stacked.dtype)
    return batch


def heldout_loss(
    unet: torch.nn.Module,
    examples: Sequence[ProbeExample],
    timesteps: Sequence[int],
    noise_scheduler,
    seed: int,
    dtype: torch.dtype,
    device,
    batch_size: int = 8,
) -> dict[int, float]:
    """Mean plain MSE (epsilon or v target, no min-SNR weighting, so curves compare across settings) of
    the UNet's prediction per probe timestep over `examples`, with each (example, timestep)'s fixed noise.

    In eval mode and without gradients; every module's train/eval mode is restored after. Examples of the same
    latent shape (one aspect-ratio bucket) are batched together, (example, timestep) pairs in a fixed
    order, so the same examples and weights give bit-identical numbers on the same machine.
    """
    if not examples:
        raise ValueError("heldout_loss needs at least one example")
    groups: dict[tuple[int, ...], list[ProbeExample]] = {}
    for example in examples:  # first-seen order: deterministic for a given list
        groups.setdefault(tuple(example.latents.shape), []).append(example)
    sums = dict.fromkeys(timesteps, 0.0)
    # Each module's own mode is restored, not the top-level one: a model with frozen parts kept in eval
    # mode must come back exactly as it was.
    modes = [(module, module.training) for module in unet.modules()]
    unet.eval()  # LoRA dropout off: the loss must not depend on a random mask
    try:
        with torch.no_grad():
            for shape, group in groups.items():
                pairs = [(example, t) for example in group for t in timesteps]
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start : start + batch_size]
                    losses = _chunk_losses(unet, chunk, shape, noise_scheduler, seed, dtype, device)
                    for (_, t), loss in zip(chunk, losses):
                        sums[t] += loss
    finally:
        for module, training in modes:
            module.training = training
    return {t: sums[t] / len(examples) for t in timesteps}


def _chunk_losses(unet, chunk, shape, noise_scheduler, seed, dtype, device) -> list[float]:
    """Per-pair MSE of one batch of (example, timestep) pairs of one latent shape."""
    latents = torch.stack([e.latents for e, _ in chunk]).to(device, torch.float32)  # (B, C, h, w)
    noise = torch.stack([probe_noise(seed, e.index, t, shape) for e, t in chunk]).to(device)  # (B, C, h, w)
    steps = torch.tensor([t for _, t in chunk], device=device, dtype=torch.long)
    inputs = collate_inputs([e.unet_inputs for e, _ in chunk], device, dtype)
    noisy, target = noised(latents, noise, steps, noise_scheduler)
    pred = unet(noisy.to(dtype), steps, **inputs, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).tolist()


def mean_loss(per_t: dict[int, float]) -> float:
    """The loss averaged over the probe timesteps (each weighs the same)."""
    return sum(per_t[t] for t in sorted(per_t)) / len(per_t)


@dataclass
class BestTracker:
    """The lowest held-out loss so far and the evaluations since it, for best/ and early stopping."""

    best_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    patience: int | None = None  # --early_stopping_patience; None never stops
    min_delta: float = 0.0  # --early_stopping_min_delta: smaller gains do not count as improvement

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is the new best (the first finite one, or lower than the best
        by more than min_delta). A non-finite loss never improves."""
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_step, self.bad_evals = float(loss), int(step), 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        """Plain JSON for the checkpoint's training_state.json (the settings come from the flags)."""
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    @classmethod
    def from_state(cls, state: dict, patience: int | None = None, min_delta: float = 0.0) -> BestTracker:
        """The tracker a checkpoint saved, with this run's --early_stopping_patience and min_delta."""
        return cls(state["best_loss"], state["best_step"], int(state["bad_evals"]), patience, min_delta)


def _csv_header(per_t: dict[int, float]) -> list[str]:
    return ["step", "val_loss", "train_loss", *(f"t{t}" for t in per_t)]


def _read_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    if not path.exists():
        return None, []
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    return (rows[0], rows[1:]) if rows else (None, [])


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def append_csv(
    path: str | Path, step: int, loss: float, train_loss: float | None, per_t: dict[int, float]
) -> None:
    """Add one evaluation to validation_loss.csv (step,val_loss,train_loss,t<timestep>...), rewriting the
    small file atomically. Rows at or after `step`, which only a killed run can have left, are replaced."""
    path = Path(path)
    header, rows = _read_rows(path)
    new_header = _csv_header(per_t)
    if rows and header != new_header:
        raise UserError(
            f"{path} holds losses at other timesteps ({','.join(header or [])}); "
            "resume with the same --validation_loss_timesteps, or move the file away"
        )
    rows = [r for r in rows if int(r[0]) < step]
    # repr: the shortest text that reads back as the same float, so resumed and uninterrupted runs compare exactly
    cells = [repr(float(x)) for x in (loss, *(per_t[t] for t in per_t))]
    rows.append([str(step), cells[0], "" if train_loss is None else repr(float(train_loss)), *cells[1:]])
    _write_rows(path, new_header, rows)


def truncate_csv(path: str | Path, after_step: int) -> None:
    """Drop the rows after `after_step`: a run resumed from that step must not keep the killed run's later ones."""
    path = Path(path)
    header, rows = _read_rows(path)
    if header is None:
        return
    kept = [r for r in rows if int(r[0]) <= after_step]
    if len(kept) != len(rows):
        _write_rows(path, header, kept)


def read_csv(path: str | Path) -> list[dict]:
    """The rows of validation_loss.csv: "step" an int, the losses floats ("train_loss" None where not
    measured), keyed by the header; [] if there is no file."""
    header, rows = _read_rows(Path(path))
    return [
        {k: int(v) if k == "step" else (float(v) if v else None) for k, v in zip(header, row)} for row in rows
    ]


VAL_COLOR, TRAIN_COLOR, BEST_COLOR = (31, 119, 180), (255, 127, 14), (44, 160, 44)


def plot_loss_curve(
    csv_path: str | Path, png_path: str | Path, best_step: int | None, size: tuple[int, int] = (480, 240)
) -> Path | None:
    """A small PNG of the held-out and training-probe losses over the steps, with the best step marked,
    drawn with PIL alone (no plotting dependency); None when there are fewer than 2 evaluations."""
    from PIL import Image, ImageDraw, ImageFont

    rows = read_csv(csv_path)
    if len(rows) < 2:
        return None
    width, height = size
    left, right, top, bottom = 52, width - 10, 22, height - 20  # the plot area inside the labels
    steps = [r["step"] for r in rows]
    losses = [r[k] for r in rows for k in ("val_loss", "train_loss") if r[k] is not None]
    lo, hi = min(losses), max(losses)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0  # a flat curve still gets a visible range
    lo, hi = lo - pad, hi + pad
    x0, x_span = steps[0], max(steps[-1] - steps[0], 1)

    def xy(step: int, loss: float) -> tuple[float, float]:
        return (
            left + (step - x0) / x_span * (right - left),
            bottom - (loss - lo) / (hi - lo) * (bottom - top),
        )

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(90, 90, 90))
    draw.text((left - 4, top), f"{hi:.4g}", fill="black", font=font, anchor="ra")
    draw.text((left - 4, bottom), f"{lo:.4g}", fill="black", font=font, anchor="rd")
    draw.text((left, bottom + 3), f"step {steps[0]}", fill="black", font=font, anchor="la")
    draw.text((right, bottom + 3), f"{steps[-1]}", fill="black", font=font, anchor="ra")
    if best_step is not None and x0 <= best_step <= steps[-1]:
        x = xy(best_step, lo)[0]
        for y in range(top, bottom, 6):  # dashed
            draw.line([(x, y), (x, min(y + 3, bottom))], fill=BEST_COLOR)
    for key, color in (("train_loss", TRAIN_COLOR), ("val_loss", VAL_COLOR)):
        points = [xy(r["step"], r[key]) for r in rows if r[key] is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
    legend = [("held-out loss", VAL_COLOR), ("training-probe loss", TRAIN_COLOR)]
    if best_step is not None:
        legend.append((f"best: step {best_step}", BEST_COLOR))
    x = left
    for text, color in legend:
        draw.rectangle([x, 8, x + 10, 14], fill=color)
        draw.text((x + 14, 11), text, fill="black", font=font, anchor="lm")
        x += 24 + draw.textlength(text, font=font)
    png_path = Path(png_path)
    with atomic_file(png_path) as tmp:
        image.save(tmp, format="PNG")
    return png_path


def save_best(output_dir: str | Path, step: int, loss: float, write_lora: Callable[[Path], object]) -> Path:
    """Replace output_dir/best/ atomically with the LoRA of `step` (written by `write_lora`, the same writer
    as the final output) and step.json {"step", "val_loss"}; on any failure the previous best/ is kept."""
    final = Path(output_dir) / BEST_DIR
    try:
        with atomic_directory(final, overwrite=True) as tmp:
            write_lora(tmp)
            (tmp / BEST_STEP_FILE).write_text(json.dumps({"step": int(step), "val_loss": float(loss)}) + "\n")
    except OSError as e:  # e.g. the disk filled up: the new folder was removed whole
        raise UserError(
            f"{final}: could not be written ({getattr(e, 'strerror', None) or e}); free some space or pass another "
            "--output_dir (the previous best/ is kept)"
        ) from None
    return final


def read_best(output_dir: str | Path) -> dict | None:
    """best/step.json ({"step", "val_loss"}), or None if there is no best/ yet."""
    path = Path(output_dir) / BEST_DIR / BEST_STEP_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class ProbeSet:
    """Examples scored by the fixed-noise loss: their pictures and captions, and their latent cache if any."""

    images: object  # data.TrainImages
    cache: object | None  # cache.LatentCache
    indices: list[int]


class LossProbes:
    """The held-out loss and the same loss on a fixed sample of training images, evaluated on demand.

    Latents are the deterministic means of the images' latent distributions (from the cache when it is
    on), computed once; the captions are the examples' own, without dropout or shuffling, and are encoded
    at each evaluation (cheap, and right when the text encoder is trained).
    """

    def __init__(
        self, base, heldout: ProbeSet, train: ProbeSet, timesteps: list[int], seed: int, device, dtype
    ):
        self.base, self.sets, self.timesteps = base, {"val": heldout, "train": train}, timesteps
        self.seed, self.device, self.dtype = seed, device, dtype
        self.latents = {name: self._latents(probe) for name, probe in self.sets.items()}

    def _latents(self, probe: ProbeSet) -> list[torch.Tensor]:
        from .cache import scale_latents

        if probe.cache is not None:
            return [probe.cache.mean(i, False) for i in probe.indices]
        vae, out = self.base.vae, []
        home = next(vae.parameters()).device
        vae.to(self.device)
        with torch.no_grad():
            for i in probe.indices:
                pixels = probe.images.pixels(i, False, probe.images.placements[i].crop)[None]  # (1, 3, H, W)
                mean = vae.encode(pixels.to(self.device, self.base.vae_dtype or self.dtype)).latent_dist.mean[
                    0
                ]
                out.append(
                    scale_latents(
                        mean.float().cpu(),
                        vae.config.scaling_factor,
                        getattr(vae.config, "shift_factor", None),
                    )
                )
        vae.to(home)
        return out

    def _examples(self, name: str, text_encoders) -> list[ProbeExample]:
        from .caption_controls import options
        from .families import time_ids

        probe, family = self.sets[name], self.base.family
        captions = [
            probe.images.controls.decorate(str(options(probe.images.raw_captions[i])[0]))
            for i in probe.indices
        ]
        with torch.no_grad():
            text = family.encode_prompts(self.base.tokenizers, text_encoders, captions, self.device)
        ids = None
        if family.uses_time_ids:
            places = [probe.images.placements[i] for i in probe.indices]
            ids = torch.tensor(
                [time_ids(p.original, p.crop_for(False), p.bucket) for p in places], dtype=torch.float32
            )
        inputs = split_inputs(family.unet_inputs({k: v.float().cpu() for k, v in text.items()}, ids))
        return [ProbeExample(i, lat, inp) for i, lat, inp in zip(probe.indices, self.latents[name], inputs)]

    def evaluate(self, unet, text_encoders, noise_scheduler) -> dict[str, dict[int, float]]:
        """{"val": per-timestep held-out loss, "train": the same on the training sample}."""
        homes = [next(e.parameters()).device for e in text_encoders]
        for encoder in text_encoders:
            encoder.to(self.device)
        try:
            return {
                name: heldout_loss(
                    unet,
                    self._examples(name, text_encoders),
                    self.timesteps,
                    noise_scheduler,
                    self.seed,
                    self.dtype,
                    self.device,
                )
                for name in self.sets
            }
        finally:
            for encoder, home in zip(text_encoders, homes):
                encoder.to(home)
