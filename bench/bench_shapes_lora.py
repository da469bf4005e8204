"""The LoRA demo on tiny-shapes: a LoRA teaches the pretrained tiny model a shape it has never drawn.

    python bench/bench_shapes_lora.py --shape star --max_train_steps 300 --learning_rate 1e-3 --threads 2

Writes a folder of demo pictures of a held-out shape with trigger-word captions (sdlora/shapes.py),
trains a LoRA on it with the real trainer (train_text_to_image_lora.py, in a subprocess with
OMP_NUM_THREADS=--threads), then generates with sdlora.generation.load_pipeline(base, lora) and scores
(sdlora/shapes_score.py): how often trigger prompts of new colour pairs draw the new shape (the concept
rate), before and after, and how well in-distribution prompts keep their shapes (retention). Prints a
table and writes it as JSON to <work_dir>/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sdlora.shapes import HELD_OUT_SHAPES, TRIGGER, caption, demo_scenes, demo_set, write_image_folder  # noqa: E402
from sdlora.shapes_eval import GUIDANCE_SCALE, eval_prompts, sample_and_score  # noqa: E402
from sdlora.shapes_score import predict, shape_rate  # noqa: E402
from sdlora.tiny_model import TINY_SHAPES_DIR  # noqa: E402

TRAIN_SEED, EVAL_SEED = 1, 2  # demo pictures to train on; new colour pairs and places to prompt with


def train_lora(args, data_dir: Path, output_dir: Path) -> float:
    """Run the trainer; return its wall time in seconds."""
    command = [
        sys.executable, str(REPO / "train_text_to_image_lora.py"),
        "--pretrained_model_name_or_path", str(args.model), "--train_data_dir", str(data_dir),
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
        "--rank", str(args.rank), "--lora_layers", args.lora_layers, "--report_to", "none",
        "--checkpointing_steps", "100000", "--seed", str(args.seed), *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO)
    return time.perf_counter() - start


def measure(pipe, shape: str, count: int) -> dict:
    """Concept rate on trigger prompts and shape accuracy on in-distribution prompts."""
    trigger_prompts = [caption(s, TRIGGER) for s in demo_scenes(shape, count, EVAL_SEED)]
    drawn = sample_and_score(pipe, trigger_prompts, guidance_scale=GUIDANCE_SCALE)
    kept = sample_and_score(pipe, eval_prompts(count), guidance_scale=GUIDANCE_SCALE)
    return {
        "concept": shape_rate(predict(drawn["images"]), shape),
        "concept_colour": drawn["colour"],
        "retention_shape": kept["shape"],
        "retention_colour": kept["colour"],
        "retention_background": kept["background"],
    }


def main(args: argparse.Namespace) -> None:
    import torch

    from sdlora.generation import load_pipeline

    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="shapes-lora-"))
    pairs = demo_set(args.shape, args.num_images, args.regularisation, TRAIN_SEED)
    data_dir = write_image_folder(work / "data", pairs)
    base, _ = load_pipeline(str(args.model))
    before = measure(base, args.shape, args.eval_samples) if not args.skip_before else {}
    seconds = train_lora(args, data_dir, work / "lora")
    tuned, _ = load_pipeline(str(args.model), work / "lora")
    after = measure(tuned, args.shape, args.eval_samples)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "extra"} | {"extra": args.extra},
              "train_seconds": round(seconds, 1), "before": before, "after": after}  # fmt: skip
    print(f"{'':22}{'before':>8}{'after':>8}")
    for key in after:
        print(f"{key:22}{before.get(key, float('nan')):8.3f}{after[key]:8.3f}")
    print(f"training: {args.max_train_steps} steps in {seconds:.1f} s on {args.threads} thread(s)")
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(work / "result.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(TINY_SHAPES_DIR), help="the pretrained shapes model")
    p.add_argument("--shape", choices=HELD_OUT_SHAPES, default="star", help="the held-out shape to teach")
    p.add_argument("--num_images", type=int, default=16, help="pictures of the shape to train on")
    p.add_argument(
        "--regularisation", type=int, default=32, help="in-distribution pictures trained on beside them"
    )
    p.add_argument("--max_train_steps", type=int, default=300, help="LoRA training steps")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--lora_layers", choices=["attn", "attn_ff", "all"], default="attn", help="trained layers")
    p.add_argument("--train_batch_size", type=int, default=8, help="batch size")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--threads", type=int, default=1, help="threads of the training run (2 to time it)")
    p.add_argument("--eval_samples", type=int, default=48, help="samples per score")
    p.add_argument("--skip_before", action="store_true", help="score only the LoRA, not the base")
    p.add_argument("--work_dir", default=None, help="folder for data, LoRA and result (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more trainer flags, after --")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
