"""The learning benchmark: configurations x seeds of a LoRA that teaches tiny-shapes a held-out shape (a heart).

    python bench/bench_learning.py --seeds 0 1 2 --jobs 2            # every row, 3 seeds, 2 runs at a time
    python bench/bench_learning.py --rows default plain ema --seeds 0

Each run is bench/bench_shapes_lora.py's: demo pictures of the shape with trigger captions beside
in-distribution pictures, the real trainer (one thread per run), then generation through
sdlora.generation.load_pipeline and the shapes scorer. For each row it prints the mean and the spread
(min-max) across seeds of: the concept rate (trigger prompts of new colour pairs that draw the shape),
retention (in-distribution shape and colour accuracy with the LoRA applied), the trainer's held-out loss on
8 new pictures of the shape at the last step, the training wall seconds, and with --curve_every N the steps
and seconds (from the trainer's start to the checkpoint's save) to the first checkpoint with a concept rate
of 0.6.
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

# The default recipe: the README's main command (recipes/tiny-shapes.toml on images/: a heart's 16 pictures
# beside 32 of the known shapes as ordinary data; LoRA of the attention layers, rank 4, lr 1e-3, 300 steps,
# batch 8), with one lever changed per row.
ROWS = {
    "default": [],
    "no_reg": ["--regularisation", "0"],  # the shape's pictures alone
    "data64": ["--regularisation", "64"],  # twice the known-shape pictures
    # prior preservation: the known shapes as a kohya is_reg subset (the default before this stop)
    "prior256": ["--reg_mode", "is_reg", "--regularisation", "256"],
    "prior32": ["--reg_mode", "is_reg", "--regularisation", "32"],  # the same with 32 class pictures
    "prior256_w2": ["--reg_mode", "is_reg", "--regularisation", "256", "--", "--prior_loss_weight", "2"],
    "star": ["--shape", "star"],  # the star: its VAE reconstructions are clean stars only 23% of the time
    "plain": ["--", "--no-cache_latents", "--no-cache_text_embeddings"],  # the diffusers example's path
    "busy": ["--busy_background"],  # the shape's pictures on clutter their captions do not name
    "busy_masked": ["--busy_background", "--", "--masked_loss"],  # the same, learning only the shape
    "attn_ff": ["--lora_layers", "attn_ff"],
    "all": ["--lora_layers", "all"],
    "rank16": ["--rank", "16"],
    "lr2e-3": ["--learning_rate", "2e-3"],
    "steps600": ["--max_train_steps", "600"],
    "steps600_b4": ["--max_train_steps", "600", "--train_batch_size", "4"],  # same compute, twice the updates
    "cosine_lr2e-3": ["--learning_rate", "2e-3", "--", "--lr_scheduler", "cosine", "--lr_warmup_steps", "0"],
    "te": ["--", "--train_text_encoder"],
    "ema": ["--", "--use_ema"],
    "snr5": ["--", "--snr_gamma", "5"],
    "loha": ["--", "--network_type", "loha"],
    "lokr": ["--", "--network_type", "lokr"],
    "huber": ["--", "--loss_type", "huber", "--huber_schedule", "snr"],
    "logit_normal": ["--", "--timestep_sampling", "logit_normal"],
    "multires": ["--", "--multires_noise_iterations", "6", "--multires_noise_discount", "0.3"],
    "prodigy": ["--learning_rate", "1.0", "--", "--optimizer_type", "Prodigy"],
    "lion": ["--learning_rate", "1e-4", "--", "--optimizer_type", "Lion"],
    "loraplus": ["--", "--loraplus_lr_ratio", "16"],
}


def run(row: str, seed: int, work: Path, eval_samples: int, curve_every: int) -> dict:
    """One bench_shapes_lora.py run in a subprocess (one thread); its result.json."""
    folder = work / f"{row}-seed{seed}"
    flags = list(ROWS[row])
    extra = flags[flags.index("--") :] if "--" in flags else []
    own = flags[: flags.index("--")] if "--" in flags else flags
    command = [
        sys.executable, str(REPO / "bench/bench_shapes_lora.py"), "--seed", str(seed), "--threads", "1",
        "--eval_samples", str(eval_samples), "--skip_before", "--curve_every", str(curve_every),
        "--work_dir", str(folder), *own, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
    return json.loads((folder / "result.json").read_text())


def base_rates(eval_samples: int) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from sdlora.generation import load_pipeline
    from sdlora.shapes_demo import DEFAULT_SHAPE, measure
    from sdlora.tiny_model import TINY_SHAPES_DIR

    torch.set_num_threads(1)
    base, _ = load_pipeline(str(TINY_SHAPES_DIR))
    return measure(base, DEFAULT_SHAPE, eval_samples)[0]


def reached(result: dict) -> dict:
    """Steps and seconds to the first checkpoint with a concept rate of 0.6 (None: not reached)."""
    first = result.get("reached") or {}
    return {"steps_to_0.6": first.get("step"), "seconds_to_0.6": first.get("seconds")}


def spread(values: list) -> str:
    if any(v is None for v in values):  # a seed that never reached the goal
        return f"{sum(v is not None for v in values)}/{len(values)} reached"
    mean = sum(values) / len(values)
    return f"{mean:5.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{mean:5.2f}"


def main(args: argparse.Namespace) -> None:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-learning-"))
    jobs = [(row, seed) for row in args.rows for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(
            zip(jobs, pool.map(lambda j: run(*j, work, args.eval_samples, args.curve_every), jobs))
        )
    base = base_rates(args.eval_samples)
    keys = ("concept", "concept_background", "retention_shape", "retention_colour", "heldout_loss")
    timing = ("train_seconds", "steps_to_0.6", "seconds_to_0.6") if args.curve_every else ("train_seconds",)
    print(f"{'row':10}" + "".join(f" {k:>23}" for k in (*keys, *timing)))
    print(f"{'base':10}" + "".join(f" {base.get(k, float('nan')):23.2f}" for k in keys))
    table = {"base": base}
    for row in args.rows:
        found = [results[(row, seed)] | reached(results[(row, seed)]) for seed in args.seeds]
        cells = [spread([r["after"][k] for r in found]) for k in keys]
        cells += [spread([r[k] for r in found]) for k in timing]
        print(f"{row:10}" + "".join(f" {c:>23}" for c in cells))
        table[row] = [r["after"] | {k: r[k] for k in timing} for r in found]
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
    p.add_argument(
        "--curve_every", type=int, default=0, help="score checkpoints every N steps: steps and seconds to 0.6"
    )
    p.add_argument("--work_dir", default=None, help="where runs are kept (default: a temp dir)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
