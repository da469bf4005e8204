"""Prompt files with per-prompt settings: kohya's line options, JSON and TOML, and their one-line errors."""

from __future__ import annotations

import json

import pytest

from sdlora.errors import UserError
from sdlora.prompts import Prompt, parse_line, read_prompt_file, with_negatives


def test_kohya_line_options_json_and_toml_give_the_same_prompts(tmp_path):
    expected = [
        Prompt(
            "a sks dog",
            negative="blurry, low quality",
            width=768,
            height=512,
            seed=42,
            guidance_scale=7.0,
            steps=28,
        ),  # fmt: skip
        Prompt("a cat"),
    ]
    line = "a sks dog --n blurry, low quality --w 768 --h 512 --d 42 --l 7 --s 28"
    (tmp_path / "p.txt").write_text(f"# kohya's sample prompts\n{line}\n\na cat\n")
    entry = {"prompt": "a sks dog", "negative_prompt": "blurry, low quality", "width": 768, "height": 512}
    entry.update(seed=42, scale=7, sample_steps=28)
    (tmp_path / "p.json").write_text(json.dumps([entry, "a cat"]))
    (tmp_path / "kohya.toml").write_text(
        '[prompt]\nwidth = 768\nheight = 512\n[[prompt.subset]]\nprompt = "a sks dog"\n'
        'negative_prompt = "blurry, low quality"\nseed = 42\nscale = 7.0\nsample_steps = 28\n'
        '[[prompt.subset]]\nprompt = "a cat"\nwidth = 64\n'
    )
    assert read_prompt_file(tmp_path / "p.txt") == expected
    assert read_prompt_file(tmp_path / "p.json") == expected
    from_toml = read_prompt_file(tmp_path / "kohya.toml")  # [prompt]'s defaults, each subset's over them
    assert from_toml == [expected[0], Prompt("a cat", width=64, height=512)]
    assert expected[0].settings() == {
        "negative_prompt": "blurry, low quality", "width": 768, "height": 512, "seed": 42, "guidance_scale": 7.0,
        "num_inference_steps": 28,
    }  # fmt: skip
    # The negatives file fills in where a prompt has none of its own.
    assert [p.negative for p in with_negatives(expected, ["ugly"])] == ["blurry, low quality", "ugly"]


@pytest.mark.parametrize(
    "name,text,words",
    [
        ("p.txt", "a dog --x 3\n", ["p.txt prompt 1", "--x"]),
        ("p.txt", "a dog --w 100\n", ["p.txt prompt 1", "width 100", "multiple of 8"]),
        ("p.txt", "a dog --d seven\n", ["--d", "'seven'", "integer"]),
        ("p.json", '[{"prompt": "a", "size": 3}]', ["p.json prompt 1", "'size'"]),
        ("p.json", "[{", ["p.json", "not valid JSON"]),
        ("p.toml", "[other]\n", ["p.toml", "[[prompt]]"]),
        ("p.txt", "# only a comment\n", ["p.txt", "no prompts"]),
    ],
)
def test_bad_prompt_files_are_one_line_naming_the_file(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as error:
        read_prompt_file(tmp_path / name)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_plain_prompt_is_unchanged():
    assert parse_line("a red circle on a white background") == Prompt("a red circle on a white background")
