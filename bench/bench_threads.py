"""The tiny demo's training step on a quiet CPU and beside one competing CPU-bound process, under the thread
settings the launcher could choose: every core (what it asked for before), every core with OpenMP's passive
wait, the free cores (sdlora.cpu, what it asks for now) with the passive wait, and one thread.

    python bench/bench_threads.py [--steps 150]

Each row trains the built-in tiny SD 1.x model (cached latents and text, batch 4, 64 px, the demo's recipe)
in a fresh process and reads the trainer's own time split ("train N s") for seconds per step; the competitor
is a pure-Python busy loop, which holds one core and takes no OpenMP threads. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def settings(cores: int) -> dict[str, dict[str, str]]:
    return {
        f"every core ({cores} threads), default wait": {"OMP_NUM_THREADS": str(cores)},
        f"every core ({cores} threads), OMP_WAIT_POLICY=PASSIVE": {
            "OMP_NUM_THREADS": str(cores),
            "OMP_WAIT_POLICY": "PASSIVE",
        },
        "free cores (sdlora.cpu), PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "FREE": "1"},
        "free cores (sdlora.cpu), default wait: the launcher's": {"FREE": "1"},
        "1 thread": {"OMP_NUM_THREADS": "1"},
    }


def step_seconds(env: dict[str, str], model: str, dataset: str, steps: int) -> float:
    from sdlora.cpu import free_cores

    env = dict(env)
    if env.pop("FREE", None):
        env["OMP_NUM_THREADS"] = str(free_cores())  # read when the run starts, as the launcher does
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(REPO / "train_text_to_image_lora.py"),
            "--pretrained_model_name_or_path",
            model,
        ]
        command += [
            "--dataset_from_disk",
            "--dataset_disk_path",
            dataset,
            "--output_dir",
            out,
            "--report_to",
            "none",
        ]
        command += ["--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "1e-3"]
        command += ["--checkpointing_steps", "100000", "--random_flip", "--seed", "42"]
        result = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **env}, timeout=3600
        )
    found = re.search(r"train ([0-9.]+)s", result.stderr)
    if result.returncode or not found:
        raise RuntimeError(result.stderr[-2000:])
    return float(found.group(1)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150, help="training steps per row")
    args = parser.parse_args()
    from sdlora.captions import read_captions_json
    from sdlora.cpu import usable_cores
    from sdlora.dataset_builder import build_dataset, pair_examples
    from sdlora.sample_data import write_sample_data
    from sdlora.tiny_model import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    model = str(save_tiny_model(root / "tiny-sd"))
    write_sample_data(root)
    examples, problems = pair_examples(
        root / "images", read_captions_json(root / "image_captions.json"), "captions"
    )
    build_dataset(examples, root / "dataset", known_problems=problems)
    dataset = str(root / "dataset")
    cores = usable_cores()
    rows = {}
    for busy in (False, True):
        for name, env in settings(cores).items():
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(1.0 if busy else 0.0)  # the competitor is running when the run starts
                rows.setdefault(name, {})[busy] = step_seconds(env, model, dataset, args.steps)
            finally:
                if competitor:
                    competitor.kill()
                    competitor.wait()
    quiet_reference = rows[next(iter(rows))][False]
    print(f"# tiny SD 1.x demo step (batch 4, 64 px, cached), {cores} usable cores, {args.steps} steps a row")
    print(
        "| threads | quiet ms/step | vs before, quiet | busy ms/step (1 competing process) | busy / quiet |"
    )
    print("|---|---|---|---|---|")
    for name, t in rows.items():
        print(
            f"| {name} | {1000 * t[False]:.1f} | {t[False] / quiet_reference:.2f}x | {1000 * t[True]:.1f} | "
            f"{t[True] / t[False]:.1f}x |"
        )


if __name__ == "__main__":
    main()
