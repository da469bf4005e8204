"""validation_loss.csv and validation_loss.png: every held-out evaluation, and its curve drawn with PIL."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_file, atomic_write_text


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
