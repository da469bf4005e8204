"""Shared fixtures: offline mode, and the tiny models built once per test session."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test process, inherited by the scripts tests start: runs that tests compare bit for bit
# must use the same thread count (matmul reductions are split by thread), and with pytest-xdist's two
# workers on two cores this keeps the machine busy without oversubscribing it.
os.environ["OMP_NUM_THREADS"] = "1"
# Several processes on CPUs: accelerate's --cpu launcher starts one process whatever --num_processes says;
# `--multi_gpu --num_processes N` with ACCELERATE_USE_CPU starts N that meet over gloo (see launch()).
os.environ["ACCELERATE_USE_CPU"] = "true"

REPO = Path(__file__).resolve().parent.parent
LATEST = ("--resume_from_checkpoint", "latest")  # the resume the README recommends
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny Stable Diffusion model, saved in the diffusers layout."""
    from sdlora.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    from sdlora.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("sd2") / "tiny-sd2", family="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from sdlora.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    from sdlora.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("sd3") / "tiny-sd3", family="sd3")


@pytest.fixture
def sample_data(tmp_path) -> Path:
    """A fresh copy of the sample images, captions and prompts in a temporary folder."""
    from sdlora.sample_data import write_sample_data

    write_sample_data(tmp_path)
    return tmp_path


def build_root_dataset(root: Path) -> Path:
    """root/images + root/image_captions.json as a dataset saved by the dataset builder, in root/dataset."""
    from sdlora.captions import read_captions_json
    from sdlora.dataset_builder import build_dataset, pair_examples

    examples, problems = pair_examples(
        root / "images", read_captions_json(root / "image_captions.json"), "captions"
    )
    build_dataset(examples, root / "dataset", known_problems=problems)
    return root / "dataset"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The sample images and captions as a dataset saved by the dataset builder."""
    from sdlora.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("data")
    write_sample_data(root)
    return build_root_dataset(root)


def run_script(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run a command in a subprocess, offline; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        args, cwd=cwd or REPO, capture_output=True, text=True, env=full_env, timeout=timeout
    )


def free_port() -> int:
    """A free TCP port, so that runs of several processes in parallel tests do not meet on accelerate's default."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_model: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    """The trainer's arguments on the tiny model, small and fast."""
    return [
        "--pretrained_model_name_or_path",
        str(tiny_model),
        "--dataset_from_disk",
        "--dataset_disk_path",
        str(dataset),
        "--output_dir",
        str(output_dir),
        "--train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--seed",
        "7",
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "1",
        *extra,
    ]


def launch(processes: int = 1, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch --quiet` on the CPU with `processes` processes (the README's way).

    (--quiet: accelerate's launcher then exits 1 on a failed run instead of adding its own traceback.)"""
    where = ["--cpu"] if processes == 1 else ["--multi_gpu"]  # (with ACCELERATE_USE_CPU set above)
    return [
        *(
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--quiet",
            *where,
            "--num_processes",
            str(processes),
        ),
        *("--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", mixed_precision),
        *("--main_process_port", str(free_port())),
    ]


def train_command(
    tiny_model: Path,
    dataset: Path,
    output_dir: Path,
    *extra: str,
    processes: int = 1,
    mixed_precision: str = "no",
) -> list[str]:
    """`accelerate launch --quiet ... train_text_to_image_lora.py` on the tiny model, as users run it."""
    return [
        *launch(processes, mixed_precision),
        str(REPO / "train_text_to_image_lora.py"),
        *train_args(tiny_model, dataset, output_dir, *extra),
    ]


def script_command(tiny_model: Path, dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    """The script run directly (no launcher): for tests that kill or signal the training process itself."""
    return [
        sys.executable,
        str(REPO / "train_text_to_image_lora.py"),
        *train_args(tiny_model, dataset, output_dir, *extra),
    ]


@dataclasses.dataclass
class Result:
    returncode: int
    stderr: str
    stdout: str = ""


def train(tiny_model: Path, dataset: Path, output_dir: Path, *extra: str, env: dict | None = None) -> Result:
    """Run the trainer inside this test process, as `python train_text_to_image_lora.py ...` would: the
    same argument parsing, main() and exit codes, without the 5 s of imports a new process costs.

    For what a separate process is needed for (a launcher, several processes, kills and signals), use
    train_command or script_command with run_script."""
    return run_trainer(train_args(tiny_model, dataset, output_dir, *extra), env)


def run_trainer(argv: list[str], env: dict | None = None) -> Result:
    import contextlib
    import io
    import logging
    import traceback

    from accelerate.state import AcceleratorState, GradientState

    import train_text_to_image_lora as script
    from sdlora.errors import run_cli

    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    code = 0
    try:
        with (
            pytest.MonkeyPatch.context() as mp,
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
        ):
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            try:
                run_cli(script.main, script.parse_args(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - what a crashed process would show
                traceback.print_exc(file=err)
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Result(code, err.getvalue(), out.getvalue())


def read_trace(folder: Path) -> dict[int, list[dict]]:
    """What each process recorded with SDLORA_TRACE_DIR=folder (sdlora.faults.trace), by process."""
    import json

    return {
        int(path.stem.split("-")[1]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("rank-*.jsonl"))
    }


def lora_weights(folder: Path, name: str = "pytorch_lora_weights.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def lora_header(folder: Path, name: str = "pytorch_lora_weights.safetensors") -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / name), framework="pt") as f:
        return f.metadata() or {}


def same_weights(a: Path, b: Path) -> bool:
    """Bit-identical LoRA weights in two output (or checkpoint) folders."""
    import torch

    wa, wb = lora_weights(a), lora_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="session")
def rich_dataset(tmp_path_factory, tiny_dataset) -> Path:
    """The tiny dataset plus an `alt` caption column and a list-valued `tags` column (as Hub datasets have)."""
    import datasets

    ds = datasets.load_from_disk(str(tiny_dataset))
    ds = ds.add_column("alt", [f"an other caption number {i}" for i in range(len(ds))])
    ds = ds.add_column("tags", [[t, f"{t}, simple shape"] for t in ds["text"]])
    out = tmp_path_factory.mktemp("rich") / "dataset"
    ds.save_to_disk(str(out))
    return out


@pytest.fixture(scope="session")
def kernel(tmp_path_factory) -> str:
    """A kernelspec for this interpreter, so the notebook runs in the test's venv whatever else is installed."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "sdlora-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "sdlora test", "language": "python"})
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        yield "sdlora-test"


# The tests that take 30 s to 2 minutes (whole workflows run as the README shows them). They are collected
# first so that they start first: pytest-xdist's worksteal then spreads the short ones around them, instead
# of one worker finishing with a long test while the other sits idle (measured on 2 cores: the whole suite
# 6 min 22 s in collection order, 5 min 34 s with these first).
LONG_FIRST = (
    "test_readme_recipes.py",
    "test_readme.py::test_the",
    "test_launch_modes.py::test_two_processes",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONG_FIRST))
