"""Caption files: both path styles, all three formats, and every malformed-file error."""

from __future__ import annotations

import json

import pytest

from sdlora.captions import (
    clean_caption,
    read_captions_json,
    read_metadata_jsonl,
    read_txt_captions,
    read_validation_prompts,
    write_captions_json,
    write_metadata_jsonl,
    write_txt_captions,
)
from sdlora.errors import UserError


def test_json_round_trip_writes_relative_paths_and_keeps_non_ascii(tmp_path):
    image = tmp_path / "images" / "猫.png"
    write_captions_json(tmp_path / "image_captions.json", {image: "一只猫 — a cat"})
    raw = json.loads((tmp_path / "image_captions.json").read_text(encoding="utf-8"))
    assert raw == {"images/猫.png": "一只猫 — a cat"}
    assert read_captions_json(tmp_path / "image_captions.json") == {image: "一只猫 — a cat"}


def test_json_accepts_absolute_paths(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({str(tmp_path / "a.png"): "x"}))
    assert read_captions_json(path) == {tmp_path / "a.png": "x"}


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"a.png": "x",\n "b.png": }', "line 2 column"),
        ('{"a.png": "x", "a.png": "y"}', "listed twice"),
        ('["a.png"]', "one JSON object"),
        ('{"a.png": 3}', "not a string"),
    ],
)
def test_malformed_json_is_named_with_its_fault(tmp_path, content, words):
    path = tmp_path / "caps.json"
    path.write_text(content)
    with pytest.raises(UserError, match=words) as e:
        read_captions_json(path)
    assert str(path) in str(e.value)


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "caps.json"
    path.write_bytes(b'{"a.png": "caf\xe9"}')
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_captions_json(path)


def test_jsonl_and_txt_round_trip(tmp_path):
    captions = {tmp_path / "a.png": "first", tmp_path / "sub" / "b.png": "second"}
    write_metadata_jsonl(tmp_path / "metadata.jsonl", captions)
    assert read_metadata_jsonl(tmp_path / "metadata.jsonl") == captions
    for image in captions:
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(b"x")
    write_txt_captions(captions)
    assert read_txt_captions(tmp_path) == {k: v + "\n" for k, v in captions.items()}


def test_clean_caption_and_prompts(tmp_path):
    assert clean_caption("  a\n red\t\tcircle  ") == "a red circle"
    (tmp_path / "p.txt").write_text("# comment\none\n\n two \n")
    assert read_validation_prompts(tmp_path / "p.txt") == ["one", "two"]
