"""The Hugging Face Hub: check that a push can work before any work is done, and lose nothing when it fails.

A script that pushes calls `check_hub_ready` right after parsing its arguments, so that being offline,
logged out or holding a bad repo id costs one line and not an hour of work; at the end it calls
`upload_folder_or_explain` (a training run) or `push_dataset_or_explain` (create_dataset.py's output),
which keep the local files when the upload fails and say how to push them later.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from .errors import UserError

REPO_TYPES = ("model", "dataset", "space")


def _offline() -> bool:
    from huggingface_hub import constants

    # The constant is read once, when huggingface_hub is imported; the variable may be set after that.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def _reason(e: BaseException) -> str:
    """An exception as a short phrase for a one-line message: its type and first line."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_hub_ready(repo_id: str, token: str | None = None, repo_type: str = "model") -> str:
    """Raise a one-line UserError unless a push to repo_id can work; return the full 'namespace/name' id.

    Checks, without writing anything: not offline (HF_HUB_OFFLINE), a valid repo id (a dataset needs
    'user/name'), a token (passed, HF_TOKEN, or `hf auth login`) that the Hub accepts and that may
    write. A model id without a namespace gets the token owner's name, as the Hub would give it.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
    if _offline():
        raise UserError(
            "cannot push to the Hub: HF_HUB_OFFLINE is set; unset it (or set HF_HUB_OFFLINE=0) "
            "when online, or run without --push_to_hub"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"{repo_id!r}: not a valid Hub repo id ({e}); use 'user/name'") from None
    if repo_type == "dataset" and "/" not in repo_id:
        raise UserError(
            f"{repo_id!r}: a Hub dataset id needs your user or organisation: use 'user/{repo_id}'"
        )
    try:
        token = token or get_token()
    except Exception as e:  # an OIDC token exchange (HF_OIDC_RESOURCE) that fails raises here
        raise UserError(
            f"cannot get a Hub token ({_reason(e)}); run `hf auth login` or pass --hub_token"
        ) from None
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --hub_token")
    try:
        me = HfApi(endpoint=constants.ENDPOINT).whoami(token=token)
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise UserError(
                "the Hub refused the token (401 Unauthorized); run `hf auth login` with a valid token "
                "or pass another --hub_token"
            ) from None
        raise UserError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({_reason(e)}); check the network, "
            "or run without --push_to_hub and push later"
        ) from None
    role = (me.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise UserError(
            "the Hub token is read-only; create a write token at https://huggingface.co/settings/tokens "
            "and run `hf auth login` with it, or pass it as --hub_token"
        )
    return repo_id if "/" in repo_id else f"{me['name']}/{repo_id}"


def repo_url(repo_id: str, repo_type: str = "model") -> str:
    """The repo's page on the Hub (HF_ENDPOINT is honoured)."""
    from huggingface_hub import constants

    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{constants.ENDPOINT}/{prefix}{repo_id}"


def upload_folder_command(
    folder: str | Path, repo_id: str, repo_type: str = "model", ignore_patterns: list[str] | None = None
) -> str:
    """The `hf upload` command that uploads folder to repo_id, as a user would paste it."""
    words = ["hf", "upload", repo_id, str(folder)]
    if repo_type != "model":
        words += ["--repo-type", repo_type]
    for pattern in ignore_patterns or []:
        words += ["--exclude", pattern]
    return shlex.join(words)


def upload_folder_or_explain(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    repo_type: str = "model",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Upload folder to repo_id (created if missing) and return its URL.

    If the upload fails, folder is left as it is and a one-line UserError says where it is and gives
    the `hf upload` command that pushes it later. Call `check_hub_ready` first, before the work.
    """
    from huggingface_hub import HfApi, constants

    api = HfApi(endpoint=constants.ENDPOINT, token=token)
    try:
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, ignore_patterns=ignore_patterns
        )
    except Exception as e:
        raise UserError(
            f"uploading to {repo_url(repo_id, repo_type)} failed ({_reason(e)}); the files are kept at "
            f"{folder}; push them later with: {upload_folder_command(folder, repo_id, repo_type, ignore_patterns)}"
        ) from None
    return repo_url(repo_id, repo_type)


def push_dataset_command(dataset_dir: str | Path, repo_id: str) -> str:
    """The command that pushes a dataset saved with `save_to_disk` (or create_dataset.py) to the Hub."""
    code = (
        f"import datasets; datasets.load_from_disk({json.dumps(str(dataset_dir))})"
        f".push_to_hub({json.dumps(repo_id)})"
    )
    return shlex.join(["python", "-c", code])


def push_dataset_or_explain(
    dataset_dir: str | Path, repo_id: str, token: str | None = None, keep_at: str | Path | None = None
) -> str:
    """Push the dataset saved in dataset_dir to the Hub dataset repo_id; return its URL.

    A dataset folder is pushed as Parquet through `datasets` (`hf upload` of the folder would upload
    Arrow files the Hub cannot read as a dataset). If the push fails, the folder is kept, first moved
    to keep_at when given (for a dataset written only to be pushed), and a one-line UserError says
    where it is and gives the command that pushes it later.
    """
    import datasets

    try:
        datasets.load_from_disk(str(dataset_dir)).push_to_hub(repo_id, token=token)
    except Exception as e:
        kept = Path(dataset_dir)
        if keep_at is not None:
            Path(keep_at).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dataset_dir, keep_at)
            kept = Path(keep_at)
        raise UserError(
            f"pushing the dataset to {repo_url(repo_id, 'dataset')} failed ({_reason(e)}); it is saved at "
            f"{kept}; push it later with: {push_dataset_command(kept, repo_id)}"
        ) from None
    return repo_url(repo_id, "dataset")
