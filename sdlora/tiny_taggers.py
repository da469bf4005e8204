"""A tiny WD-style booru tagger with random weights: a small torch model exported to ONNX, with its tag list.

The same files and contract as `SmilingWolf/wd-eva02-large-tagger-v3`: `model.onnx` taking a batch of
NHWC float32 BGR images in 0..255 and returning one sigmoid score per tag, and `selected_tags.csv`
(tag_id,name,category,count) naming the tag of each output, ratings first. Exporting needs the `onnx`
and `onnxscript` packages (torch.onnx's exporter); running it needs `onnxruntime`.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch

from .errors import UserError
from .taggers import CHARACTER, GENERAL, RATING

EXPORT_NEEDS = ("onnx", "onnxscript")  # what torch.onnx.export needs beside torch

INPUT_SIZE = 40  # not the other tiny models' 32: the tagger must read its size from the ONNX input
# (name, category): the four ratings, general tags (with two kaomoji), characters; as in the real files.
TAGS = [
    *((name, RATING) for name in ("general", "sensitive", "questionable", "explicit")),
    *(
        (name, GENERAL)
        for name in (
            "1girl solo long_hair short_hair looking_at_viewer smile ^_^ o_o simple_background "
            "white_background blue_sky red_theme star_(symbol) no_humans"
        ).split()
    ),
    *((name, CHARACTER) for name in ("hatsune_miku", "kirisame_marisa", "hakurei_reimu")),
]


class TinyTagger(torch.nn.Module):
    """Scores tags from an image's colours and a few convolution features, so that images differ."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2)
        self.head = torch.nn.Linear(8 + 3, num_tags)
        torch.nn.init.normal_(self.head.weight, std=3.0)  # scores spread over (0, 1), across the thresholds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) / 255.0  # (B, H, W, 3) BGR 0..255 -> (B, 3, H, W) in 0..1
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (B, 8)
        colour = x.mean(dim=(2, 3)) - 0.5  # (B, 3)
        return torch.sigmoid(self.head(torch.cat([features, colour], dim=1)))  # (B, T)


def can_export() -> bool:
    """Whether the packages torch.onnx.export needs are installed."""
    return all(importlib.util.find_spec(name) for name in EXPORT_NEEDS)


def save_tiny_tagger(folder: str | Path, seed: int = 0) -> Path:
    """Write model.onnx and selected_tags.csv for a tiny tagger into folder (created)."""
    if not can_export():
        raise UserError(
            f"exporting the tiny tagger needs {' and '.join(EXPORT_NEEDS)}: pip install {' '.join(EXPORT_NEEDS)}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinyTagger(len(TAGS)).eval()
    example = torch.rand(2, INPUT_SIZE, INPUT_SIZE, 3) * 255
    torch.onnx.export(
        model,
        (example,),
        str(folder / "model.onnx"),
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},  # any batch size, like the real models
        verbose=False,
    )
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(TAGS):
            writer.writerow([1000 + index, name, category, 10_000 - index])
    return folder
