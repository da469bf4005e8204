"""Pushing to the Hub: refused in one line before any work when it cannot succeed; a failed upload loses nothing.

The upload tests run the real scripts against a local HTTP server standing in for the Hub
(HF_ENDPOINT): it answers /api/whoami-v2 like the Hub and fails every other request with HTTP 500.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest

from sdlora.hub import push_dataset_command, upload_folder_command

REPO = Path(__file__).resolve().parent.parent
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")


def hub_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Online mode, no saved login (an empty HF_HOME), no token; overrides on top."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARIABLES}
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    return {**env, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **overrides}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def create_dataset(
    cwd: Path, tiny_model: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(REPO / "create_dataset.py"),
        "--pretrained_model_name_or_path",
        str(tiny_model),
    ]
    return run([*command, *args], cwd, env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed run (exit 2, no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


class FakeHub(http.server.BaseHTTPRequestHandler):
    """whoami answers with `whoami_status` (200: a user with a write token); everything else is HTTP 500."""

    whoami_status = 200
    requests: list[str] = []

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.command == "GET" and self.path.startswith("/api/whoami-v2"):
            status = self.whoami_status
            body = {
                "type": "user",
                "name": "tester",
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            }
            if status != 200:
                body = {"error": "Invalid credentials in Authorization header"}
        else:
            status, body = 500, {"error": "the fake Hub fails every upload"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def fake_hub() -> Iterator[type[FakeHub]]:
    """A local stand-in for the Hub; its URL is `fake_hub.url`."""
    handler = type("Handler", (FakeHub,), {"requests": [], "whoami_status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()
    thread.join()


def nothing_written(root: Path) -> bool:
    return not (root / "datasets").exists() or not any((root / "datasets").iterdir())


@pytest.mark.slow
def test_offline_push_is_refused_before_any_image_is_read(sample_data, tiny_model, tmp_path):
    # A broken image would be reported if images were read first: the Hub check must come before.
    (sample_data / "images" / "red_circle.png").write_bytes(b"not a png")
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN="hf_fake")
    result = create_dataset(sample_data, tiny_model, env, "--push_to_hub", "--hub_dataset_id", "user/name")
    line = one_error_line(result)
    assert "HF_HUB_OFFLINE" in line and "red_circle" not in result.stderr
    assert nothing_written(sample_data)


@pytest.mark.slow
def test_push_without_a_token_is_refused_before_any_work(sample_data, tiny_model, tmp_path):
    result = create_dataset(
        sample_data, tiny_model, hub_env(tmp_path), "--push_to_hub", "--hub_dataset_id", "user/name"
    )
    line = one_error_line(result)
    assert "hf auth login" in line and "--hub_token" in line
    assert nothing_written(sample_data)


@pytest.mark.slow
@pytest.mark.parametrize(
    "repo_id,words",
    [("user/na--me", "not a valid Hub repo id"), ("a/b/c", "not a valid Hub repo id"), ("name", "user/name")],
)
def test_push_with_an_invalid_repo_id_is_refused_before_any_work(
    sample_data, tiny_model, tmp_path, repo_id, words
):
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT="http://127.0.0.1:9")  # never contacted
    result = create_dataset(sample_data, tiny_model, env, "--push_to_hub", "--hub_dataset_id", repo_id)
    assert words in one_error_line(result)
    assert nothing_written(sample_data)


@pytest.mark.slow
def test_unreachable_hub_is_refused_before_any_work(sample_data, tiny_model, tmp_path):
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT="http://127.0.0.1:9")  # discard port: refused
    result = create_dataset(sample_data, tiny_model, env, "--push_to_hub", "--user_name", "user")
    assert "cannot reach the Hub" in one_error_line(result)
    assert nothing_written(sample_data)


@pytest.mark.slow
def test_refused_token_is_reported_before_any_work(sample_data, tiny_model, tmp_path, fake_hub):
    fake_hub.whoami_status = 401
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT=fake_hub.url)
    result = create_dataset(sample_data, tiny_model, env, "--push_to_hub", "--hub_dataset_id", "user/name")
    assert "refused the token" in one_error_line(result)
    assert nothing_written(sample_data)


def kept_dataset_and_command(line: str, cwd: Path, repo_id: str) -> Path:
    """The folder the error line says the dataset is kept at; check the push-later command names it."""
    kept = cwd / line.split(" it is saved at ")[1].split(";")[0]
    command = shlex.split(line.split("push it later with: ")[1])
    assert command[:2] == ["python", "-c"]
    assert f"load_from_disk({json.dumps(str(kept.relative_to(cwd)))})" in command[2]
    assert f"push_to_hub({json.dumps(repo_id)})" in command[2]
    return kept


@pytest.mark.slow
def test_failed_push_keeps_the_saved_dataset_and_says_how_to_push_later(
    sample_data, tiny_model, tmp_path, fake_hub
):
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT=fake_hub.url)
    result = create_dataset(sample_data, tiny_model, env, "--push_to_hub", "--hub_dataset_id", "user/name")
    line = one_error_line(result)
    assert "failed" in line and "500" in line
    kept = kept_dataset_and_command(line, sample_data, "user/name")
    assert kept == sample_data / "datasets" / "Text2Image_example"
    assert len(datasets.load_from_disk(str(kept))) == 8
    assert "GET /api/whoami-v2" in fake_hub.requests  # the token was checked against the (fake) Hub


@pytest.mark.slow
def test_failed_push_without_save_to_disk_saves_the_dataset_anyway(
    sample_data, tiny_model, tmp_path, fake_hub
):
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT=fake_hub.url)
    args = ("--push_to_hub", "--hub_dataset_id", "user/name", "--no-save_to_disk")
    kept = kept_dataset_and_command(
        one_error_line(create_dataset(sample_data, tiny_model, env, *args)), sample_data, "user/name"
    )
    assert kept == sample_data / "datasets" / "Text2Image_example"
    assert len(datasets.load_from_disk(str(kept))) == 8
    # A second failure never replaces the first dataset: it is kept beside it.
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    again = kept_dataset_and_command(
        one_error_line(create_dataset(sample_data, tiny_model, env, *args)), sample_data, "user/name"
    )
    assert again == sample_data / "datasets" / "Text2Image_example-unpushed-1"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert sorted(p.name for p in (sample_data / "datasets").iterdir()) == [
        kept.name,
        again.name,
    ]  # no temporaries


UPLOAD_SCRIPT = """
import sys
from pathlib import Path
from sdlora.errors import run_cli
from sdlora.hub import check_hub_ready, upload_folder_or_explain

def main(folder):
    repo_id = check_hub_ready("my-lora", None, "model")
    print("repo", repo_id, flush=True)
    upload_folder_or_explain(folder, repo_id, None, "model", ignore_patterns=["checkpoint-*"])

run_cli(main, Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_failed_folder_upload_keeps_the_files_and_gives_the_hf_upload_command(tmp_path, fake_hub):
    """The trainer's path: check_hub_ready at the start, upload_folder_or_explain at the end."""
    folder = tmp_path / "output" / "my lora"
    folder.mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    env = hub_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT=fake_hub.url, PYTHONPATH=str(REPO))
    result = run([sys.executable, "-c", UPLOAD_SCRIPT, str(folder)], tmp_path, env)
    assert "repo tester/my-lora" in result.stdout  # a bare model name gets the token owner's namespace
    line = one_error_line(result)
    assert f"kept at {folder};" in line
    command = line.split("push them later with: ")[1]
    assert shlex.split(command) == [
        "hf",
        "upload",
        "tester/my-lora",
        str(folder),
        "--exclude",
        "checkpoint-*",
    ]
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"weights"


def test_push_later_commands_survive_the_shell(tmp_path):
    folder = tmp_path / 'it\'s a "folder" $HOME'
    assert shlex.split(upload_folder_command(folder, "u/n", "dataset")) == [
        "hf",
        "upload",
        "u/n",
        str(folder),
        "--repo-type",
        "dataset",
    ]
    code = shlex.split(push_dataset_command(folder, "u/n"))[2]
    compile(code, "<push>", "exec")  # valid Python, naming the folder exactly
    assert json.dumps(str(folder)) in code
