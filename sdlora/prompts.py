"""Prompts with their own settings, as kohya's users write them: a line `a photo of sks dog --n blurry --w 768
--h 512 --d 42 --l 7 --s 28`, a JSON list, or a TOML file of [[prompt.subset]] tables under [prompt] defaults
(kohya's sample-prompt formats). Validation, the notebook and `python -m sdlora.generate` read them alike."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import UserError

# kohya's one-letter options (library/train_util.py line_to_prompt_dict) and the Prompt field each sets.
LINE_OPTIONS = {
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
}
# JSON / TOML keys: kohya's names, and diffusers' where they differ.
DICT_KEYS = {
    "prompt": "text",
    "negative_prompt": "negative",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "scale": "guidance_scale",
    "guidance_scale": "guidance_scale",
    "sample_steps": "steps",
    "num_inference_steps": "steps",
}


@dataclass(frozen=True)
class Prompt:
    """A prompt and the settings it sets itself; None: the run's (or the caller's) setting."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None

    def __str__(self) -> str:
        return self.text

    def settings(self) -> dict:
        """The settings this prompt sets, by the generation keyword each overrides."""
        names = {"negative": "negative_prompt", "steps": "num_inference_steps"}
        return {
            names.get(f.name, f.name): getattr(self, f.name)
            for f in fields(self)
            if f.name != "text" and getattr(self, f.name) is not None
        }


def parse_line(line: str, where: str = "prompt") -> Prompt:
    """A kohya prompt line: the text, then ` --<letter> value` options (n w h d l s)."""
    text, *options = line.strip().split(" --")
    found = {}
    for option in options:
        letter, _, value = option.strip().partition(" ")
        if letter.lower() not in LINE_OPTIONS:
            known = ", ".join(f"--{k}" for k in LINE_OPTIONS)
            raise UserError(f"{where}: unknown prompt option --{letter}; use {known}")
        name, kind = LINE_OPTIONS[letter.lower()]
        found[name] = _value(kind, value.strip(), f"{where}: --{letter}")
    return _checked(Prompt(text.strip(), **found), where)


def from_dict(entry: dict, where: str) -> Prompt:
    """A JSON or TOML prompt table (kohya's keys: prompt, negative_prompt, width, height, seed, scale,
    sample_steps)."""
    unknown = sorted(set(entry) - set(DICT_KEYS) - {"enum"})
    if unknown:
        raise UserError(f"{where}: unknown prompt key {unknown[0]!r}; use {', '.join(DICT_KEYS)}")
    if not str(entry.get("prompt", "")).strip():
        raise UserError(f"{where}: a prompt table without a 'prompt'; add one")
    kinds = {f.name: f.type for f in fields(Prompt)}
    values = {
        DICT_KEYS[k]: _value(_kind(kinds[DICT_KEYS[k]]), v, f"{where}: {k}")
        for k, v in entry.items()
        if k in DICT_KEYS
    }
    return _checked(Prompt(**values), where)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a file: .json (a list of strings or tables), .toml (kohya's [prompt] with
    [[prompt.subset]], or a [[prompt]] list), else one prompt per line (# comments) with kohya's options."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompts file ({e}); pass a readable UTF-8 file") from None
    if path.suffix.lower() == ".json":
        entries = _parsed(path, lambda: json.loads(raw))
        if not isinstance(entries, list):
            raise UserError(f"{path}: a JSON prompts file is a list of prompts or prompt tables")
    elif path.suffix.lower() == ".toml":
        import tomllib

        data = _parsed(path, lambda: tomllib.loads(raw))
        entries = _toml_entries(data, path)
    else:
        entries = [
            line for line in (s.strip() for s in raw.splitlines()) if line and not line.startswith("#")
        ]
    prompts = [
        parse_line(e, f"{path} prompt {i + 1}")
        if isinstance(e, str)
        else from_dict(e, f"{path} prompt {i + 1}")
        for i, e in enumerate(entries)
    ]
    if not prompts:
        raise UserError(f"{path}: no prompts found; write one prompt per line")
    return prompts


def with_negatives(prompts: list[Prompt], negatives: list[str] | None) -> list[Prompt]:
    """Each prompt with the negatives file's line of its position (cycled), where it sets none itself."""
    if not negatives:
        return prompts
    return [
        p if p.negative is not None else replace(p, negative=negatives[i % len(negatives)])
        for i, p in enumerate(prompts)
    ]


def _toml_entries(data: dict, path: Path) -> list:
    table = data.get("prompt")
    if isinstance(table, list):  # [[prompt]] tables
        return table
    if isinstance(table, dict) and isinstance(table.get("subset"), list):  # kohya's layout
        defaults = {k: v for k, v in table.items() if k != "subset"}
        return [{**defaults, **entry} for entry in table["subset"]]
    raise UserError(
        f"{path}: a TOML prompts file holds [[prompt]] tables, or [prompt] defaults with [[prompt.subset]]"
    )


def _parsed(path: Path, parse):
    try:
        return parse()
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise UserError(f"{path}: not valid {path.suffix[1:].upper()} ({e}); fix the file") from None


def _kind(annotation) -> type:
    return {"int | None": int, "float | None": float}.get(str(annotation), str)


def _value(kind: type, value, where: str):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a{'n integer' if kind is int else ' number'}") from None


def _checked(prompt: Prompt, where: str) -> Prompt:
    for name in ("width", "height"):
        size = getattr(prompt, name)
        if size is not None and (size < 8 or size % 8):
            raise UserError(f"{where}: {name} {size} must be a positive multiple of 8")
    if prompt.steps is not None and prompt.steps < 1:
        raise UserError(f"{where}: steps {prompt.steps} must be at least 1")
    if not prompt.text:
        raise UserError(f"{where}: an empty prompt; write its text before the options")
    return prompt


def is_prompt_file(text: str) -> bool:
    """Whether a --prompts value names a file (a .txt, .json or .toml name must be one)."""
    return os.path.isfile(text) or bool(re.search(r"\.(txt|json|toml)$", text, re.IGNORECASE))
