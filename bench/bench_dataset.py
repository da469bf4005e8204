"""Peak memory and time of create_dataset.py as the number of photos grows.

    python bench/bench_dataset.py                          # 250, 1000 and 4000 photos, this checkout
    python bench/bench_dataset.py --repo /tmp/old --label old --work_dir /tmp/bench_dataset

Writes N synthetic 768x512 JPEG photos (a smooth random colour field plus grain: about 125 KB each,
like a real photo at quality 90) with captions, runs create_dataset.py on them in a child process and
reports the child's peak RSS (from wait4, so each run is measured alone) and wall time. --repo runs
the create_dataset.py of another checkout (e.g. a `git worktree` of an older commit) on the same
photos; --work_dir keeps the photos between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def photo(seed: int) -> Image.Image:
    """A 768x512 picture whose JPEG size is close to a photo's: smooth colour regions plus sensor-like grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (768, 512), Image.BICUBIC
    )
    grain = rng.normal(0, 9, (512, 768, 3))
    return Image.fromarray(np.clip(np.asarray(field, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def photo_pool(folder: Path, count: int) -> list[Path]:
    """count photos in folder, made once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            photo(i).save(path, quality=90)
    return paths


def image_folder(work: Path, pool: list[Path], count: int) -> tuple[Path, int]:
    """A folder of the first count photos (hard links) and its image_captions.json; return it and its bytes."""
    folder = work / f"photos_{count}"
    images = folder / "images"
    if not (folder / "image_captions.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        images.mkdir(parents=True)
        for path in pool[:count]:
            os.link(path, images / path.name)
        captions = {
            f"images/{p.name}": f"a photo of a landscape, number {i}" for i, p in enumerate(pool[:count])
        }
        (folder / "image_captions.json").write_text(json.dumps(captions))
    return folder, sum(p.stat().st_size for p in images.iterdir())


def run_create_dataset(repo: Path, folder: Path, model: Path) -> tuple[float, float]:
    """Run create_dataset.py in a child process; return (peak RSS in MB, seconds)."""
    shutil.rmtree(folder / "datasets", ignore_errors=True)
    command = [
        sys.executable,
        str(repo / "create_dataset.py"),
        "--pretrained_model_name_or_path",
        str(model),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the maximum over all children
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"create_dataset.py failed in {folder}:\n{output.decode(errors='replace')}")
    shutil.rmtree(folder / "datasets")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[250, 1000, 4000], help="numbers of photos")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose create_dataset.py is run")
    parser.add_argument("--label", default="new", help="first column of the table, e.g. the commit")
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="keep the photos here (default: temporary)"
    )
    args = parser.parse_args()

    from sdlora.tiny_model import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        model = work / "tiny-sd"
        if not (model / "model_index.json").exists():
            save_tiny_model(model)
        pool = photo_pool(work / "pool", max(args.counts))
        print(f"# create_dataset.py from {args.repo}; 768x512 JPEG photos; peak RSS of the child process")
        print("| code | N | MB on disk | peak RSS MB | seconds | s per 1000 images |")
        print("|---|---|---|---|---|---|")
        for count in args.counts:
            folder, size = image_folder(work, pool, count)
            rss, seconds = run_create_dataset(args.repo, folder, model)
            print(
                f"| {args.label} | {count} | {size / 1e6:.0f} | {rss:.0f} | {seconds:.1f} "
                f"| {seconds / count * 1000:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
