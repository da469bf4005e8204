"""The trainer's peak memory as the dataset grows: latent cache in memory against on disk (read on demand).

    python bench/bench_cache.py                        # 1,000 and 8,000 photos on the built-in tiny model
    python bench/bench_cache.py --counts 500 2000       # other sizes

For each count it draws that many small photos of mixed aspect ratios, builds the dataset with
create_dataset.py, then runs the trainer for a few steps twice: with the latent cache in memory (the
default under --cache_memory_limit_gb) and with --cache_latents_to_disk. Each run is its own process;
its peak RSS is read from the kernel when it ends (os.wait4). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SIZES = [(96, 64), (64, 96), (80, 80), (128, 96), (96, 128), (112, 64)]


def make_photos(folder: Path, n: int) -> None:
    """n small photos of mixed shapes with a caption file beside each (kohya's .txt)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"photo_{i:05d}.png")
        (folder / f"photo_{i:05d}.txt").write_text(f"a photo number {i % 97}, red, blue")


def run(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{err[-2000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 8000], help="dataset sizes")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    args = p.parse_args()
    from sdlora.tiny_model import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny-sd")
        print(f"# tiny model, {args.steps} steps at batch 4, random flips; {time.strftime('%Y-%m-%d')}")
        print("| images | latent cache | cache GB (est.) | seconds | peak RSS MB |")
        print("|---:|---|---:|---:|---:|")
        for n in args.counts:
            make_photos(tmp / f"photos-{n}", n)
            dataset = tmp / "datasets" / f"d{n}"
            run([sys.executable, "create_dataset.py", "--images_dir", str(tmp / f"photos-{n}"), "--captions_file",
                 str(tmp / "none.json"), "--output_dir", str(dataset.parent), "--dataset_name", dataset.name,
                 "--pretrained_model_name_or_path", str(model)])  # fmt: skip
            for where, extra in (("memory", []), ("disk", ["--cache_latents_to_disk"])):
                out = tmp / f"out-{n}-{where}"
                seconds, rss = run([sys.executable, "train_text_to_image_lora.py", "--pretrained_model_name_or_path",
                                    str(model), "--dataset_from_disk", "--dataset_disk_path", str(dataset),
                                    "--output_dir", str(out), "--train_batch_size", "4", "--max_train_steps",
                                    str(args.steps), "--random_flip", "--report_to", "none", *extra])  # fmt: skip
                # mean and log-variance (8 channels at 1/8 size, fp32) per image and flip
                cache_gb = (
                    sum(8 * 4 * 2 * (w // 8) * (h // 8) for w, h in (SIZES[i % len(SIZES)] for i in range(n)))
                    / 1e9
                )
                print(f"| {n} | {where} | {cache_gb:.3f} | {seconds:.1f} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
