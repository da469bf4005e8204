"""The learning benchmark: configurations x seeds of a LoRA that teaches tiny-shapes a held-out shape.

    python bench/bench_learning.py --seeds 0 1 2 --jobs 2            # every row, 3 seeds, 2 runs at a time
    python bench/bench_learning.py --rows default plain ema --seeds 0

Each run is bench/bench_shapes_lora.py's: demo pictures of the shape with trigger captions beside
in-distribution pictures, the real trainer (one thread per run), then generation through
sdlora.generation.load_pipeline and the shapes scorer. For each row it prints the mean and the spread
(min-max) across seeds of: the concept rate (trigger prompts of new colour pairs that draw the shape),
retention (in-distribution shape and colour accuracy with the LoRA applied) and the training wall seconds.
The base model's own rates are the row "base". Rows are the default recipe with one lever changed; the
levers' issues add theirs here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The default recipe (bench_shapes_lora.py's defaults: attention LoRA, rank 4, lr 1e-3, 300 steps, batch 8)
# with one lever changed per row.
ROWS = {
    "default": [],
    "no_reg": ["--regularisation", "0"],  # the shape's pictures alone
    "prior": ["--reg_mode", "is_reg"],  # the in-distribution pictures as prior-preservation class images
    "plain": ["--", "--no-cache_latents", "--no-cache_text_embeddings"],  # the diffusers example's path
    "busy": ["--busy_background"],  # the shape's pictures on clutter their captions do not name
    "busy_masked": ["--busy_background", "--", "--masked_loss"],  # the same, learning only the shape
    "attn_ff": ["--lora_layers", "attn_ff"],
    "all": ["--lora_layers", "all"],
    "rank16": ["--rank", "16"],
    "lr3e-3": ["--learning_rate", "3e-3"],
    "ema": ["--", "--use_ema"],
    "snr5": ["--", "--snr_gamma", "5"],
    "snr5_lr3e-3": ["--learning_rate", "3e-3", "--", "--snr_gamma", "5"],
    "loha": ["--", "--network_type", "loha"],
    "lokr": ["--", "--network_type", "lokr"],
    "huber": ["--", "--loss_type", "huber", "--huber_schedule", "snr"],
    "logit_normal": ["--", "--timestep_sampling", "logit_normal"],
    "multires": ["--", "--multires_noise_iterations", "6", "--multires_noise_discount", "0.3"],
    "prodigy": ["--learning_rate", "1.0", "--", "--optimizer_type", "Prodigy"],
    "lion": ["--learning_rate", "1e-4", "--", "--optimizer_type", "Lion"],
    "loraplus": ["--", "--loraplus_lr_ratio", "16"],
}


def run(row: str, seed: int, work: Path, eval_samples: int) -> dict:
    """One bench_shapes_lora.py run in a subprocess (one thread); its result.json."""
    folder = work / f"{row}-seed{seed}"
    flags = list(ROWS[row])
    extra = flags[flags.index("--") :] if "--" in flags else []
    own = flags[: flags.index("--")] if "--" in flags else flags
    command = [
        sys.executable, str(REPO / "bench/bench_shapes_lora.py"), "--seed", str(seed), "--threads", "1",
        "--eval_samples", str(eval_samples), "--skip_before", "--work_dir", str(folder), *own, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
    return json.loads((folder / "result.json").read_text())


def base_rates(eval_samples: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from bench.bench_shapes_lora import measure
    from sdlora.generation import load_pipeline
    from sdlora.tiny_model import TINY_SHAPES_DIR

    torch.set_num_threads(1)
    base, _ = load_pipeline(str(TINY_SHAPES_DIR))
    return measure(base, "star", eval_samples)


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:5.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{mean:5.2f}"


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-learning-"))
    jobs = [(row, seed) for row in args.rows for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda j: run(*j, work, args.eval_samples), jobs)))
    base = base_rates(args.eval_samples)
    keys = ("concept", "concept_background", "retention_shape", "retention_colour")
    print(f"{'row':10}" + "".join(f"{k:>22}" for k in (*keys, "train_seconds")))
    print(f"{'base':10}" + "".join(f"{base[k]:22.2f}" for k in keys) + f"{'':>22}")
    table = {"base": base}
    for row in args.rows:
        found = [results[(row, seed)] for seed in args.seeds]
        cells = [spread([r["after"][k] for r in found]) for k in keys]
        cells.append(spread([r["train_seconds"] for r in found]))
        print(f"{row:10}" + "".join(f"{c:>22}" for c in cells))
        table[row] = [r["after"] | {"train_seconds": r["train_seconds"]} for r in found]
    (work / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    print(
        f"({len(args.seeds)} seeds; mean (min-max); {args.eval_samples} samples per score; {work}/table.json)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="configurations")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each: at most the cores)")
    p.add_argument("--eval_samples", type=int, default=32, help="samples per score")
    p.add_argument("--work_dir", default=None, help="where runs are kept (default: a temp dir)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
