"""A sentence and tags together ("sentence, tag, tag"): tags from a second model or from an earlier run's file
in any format, and create_dataset.py reading every format generate_captions.py writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from captioning_tools import caption, ok, run_command

from sdlora.captioning import join_tags
from sdlora.captions import read_captions_json, read_metadata_jsonl, read_txt_captions
from sdlora.images import find_images

FAST = ["--max_new_tokens", "5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Florence-2 always; the tiny tagger too where its optional dependencies are installed."""
    from sdlora.tiny_captioners import save_tiny_captioners
    from sdlora.tiny_taggers import can_export

    kinds = (
        ("florence2", "wd-tagger")
        if can_export() and importlib.util.find_spec("onnxruntime")
        else ("florence2",)
    )
    return save_tiny_captioners(tmp_path_factory.mktemp("models"), kinds=kinds)


@pytest.fixture
def tagger(models) -> Path:
    if "wd-tagger" not in models:
        pytest.skip("the tagger needs onnxruntime, onnx and onnxscript")
    return models["wd-tagger"]


def resolved(captions: dict[Path, str]) -> dict[Path, str]:
    return {path.resolve(): text.strip() for path, text in captions.items()}


def run_alone(sample_data: Path, model: Path, name: str, *extra: str) -> dict[Path, str]:
    """One model's captions for the sample images, written to a JSON file of its own."""
    output = sample_data / f"{name}.json"
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(output)]
    ok(caption(*args, "--model_name_or_path", str(model), *extra))
    return resolved(read_captions_json(output))


def test_a_sentence_and_tags_join_as_kohya_users_write_them():
    assert (
        join_tags("A red circle on a blue background.", "1girl, solo")
        == "A red circle on a blue background, 1girl, solo"
    )
    assert join_tags("a red circle", "") == "a red circle"
    assert join_tags("", "1girl") == "1girl"
    assert join_tags("Wait...", "solo", " | ") == "Wait... | solo"


def test_a_tagger_beside_the_captioner_appends_its_tags(sample_data, models, tagger):
    sentences = run_alone(sample_data, models["florence2"], "sentences", *FAST)
    tags = run_alone(sample_data, tagger, "tags", "--replace_underscores")
    both = run_alone(sample_data, models["florence2"], "both", *FAST, "--tagger_model_name_or_path",
                     str(tagger), "--replace_underscores", "--prefix", "ohwx,")  # fmt: skip
    assert both == {p: f"ohwx, {join_tags(sentences[p], tags[p])}" for p in sentences}
    assert all(tags.values()) and all(sentences.values())


@pytest.mark.parametrize("fmt", ["json", "jsonl", "txt"])
def test_tags_are_appended_from_an_earlier_run_in_any_format(sample_data, models, tagger, fmt):
    images_dir = sample_data / "images"
    source = {"json": sample_data / "tags.json", "jsonl": sample_data / "tags.jsonl", "txt": images_dir}[fmt]
    tag_run = [
        "--images_dir",
        str(images_dir),
        "--format",
        fmt,
        "--model_name_or_path",
        str(tagger),
    ]
    ok(caption(*tag_run, *([] if fmt == "txt" else ["--output_file", str(source)])))
    tags = resolved(
        {"json": read_captions_json, "jsonl": read_metadata_jsonl, "txt": read_txt_captions}[fmt](source)
    )
    untagged = find_images(images_dir)[0]  # the earlier run missed one image
    if fmt == "txt":
        untagged.with_suffix(".txt").unlink()
    else:
        text = source.read_text(encoding="utf-8")
        kept = [line for line in text.splitlines() if untagged.name not in line]
        source.write_text("\n".join(kept).replace(",\n}", "\n}") + "\n", encoding="utf-8")
    sentences = run_alone(sample_data, models["florence2"], "sentences", *FAST)

    output = sample_data / "combined.json"
    result = ok(caption("--images_dir", str(images_dir), "--output_file", str(output), *FAST,
                        "--model_name_or_path", str(models["florence2"]), "--append_tags_from", str(source)))  # fmt: skip

    assert f"1 of them have no tags in {source}" in result.stdout and str(untagged) in result.stdout
    combined = resolved(read_captions_json(output))
    assert combined.pop(untagged.resolve()) == sentences[untagged.resolve()]
    assert combined == {p: join_tags(sentences[p], tags[p]) for p in combined}


def test_two_sources_of_tags_or_two_taggers_are_refused(sample_data, models, tagger):
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(sample_data / "c.json")]
    both = caption(*args, "--model_name_or_path", str(models["florence2"]), "--append_tags_from", "x.json",
                   "--tagger_model_name_or_path", str(tagger))  # fmt: skip
    assert both.returncode == 2 and "pass one source of tags" in both.stderr
    two = caption(*args, "--model_name_or_path", str(tagger), "--tagger_model_name_or_path",
                  str(tagger))  # fmt: skip
    assert two.returncode == 2 and "already a tagger" in two.stderr
    not_a_tagger = caption(*args, "--model_name_or_path", str(models["florence2"]), "--tagger_model_name_or_path",
                           str(models["florence2"]))  # fmt: skip
    assert not_a_tagger.returncode == 2 and "a Florence-2, not a tagger" in not_a_tagger.stderr
    missing = caption(*args, "--model_name_or_path", str(models["florence2"]), "--append_tags_from",
                      str(sample_data / "absent.json"))  # fmt: skip
    assert missing.returncode == 2 and "absent.json: captions file not found" in missing.stderr
    assert not (sample_data / "c.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "jsonl", "txt"])
def test_create_dataset_reads_every_output_format(sample_data, models, tiny_model, tmp_path, fmt):
    images_dir = sample_data / "images"
    # Tags "from an earlier run", written by hand, so that the captions are "sentence, tag, tag".
    tags_file = sample_data / "tags.json"
    tags_file.write_text(json.dumps({f"images/{p.name}": "1girl, solo" for p in find_images(images_dir)}))
    written = {"json": sample_data / "captions.json", "jsonl": images_dir / "metadata.jsonl", "txt": None}[
        fmt
    ]
    args = [
        "--images_dir",
        str(images_dir),
        "--format",
        fmt,
        "--model_name_or_path",
        str(models["florence2"]),
    ]
    ok(
        caption(
            *args,
            "--append_tags_from",
            str(tags_file),
            *FAST,
            *(["--output_file", str(written)] if written else []),
        )
    )
    readers = {"json": read_captions_json, "jsonl": read_metadata_jsonl}
    captions = readers[fmt](written) if written else read_txt_captions(images_dir)

    # --captions_file names a missing file for txt: create_dataset.py then reads the .txt files.
    captions_file = written or tmp_path / "absent.json"
    result = run_command("create_dataset.py", "--images_dir", str(images_dir), "--captions_file", str(captions_file),
                         "--output_dir", str(tmp_path / "datasets"), "--dataset_name", "tagged",
                         "--pretrained_model_name_or_path", str(tiny_model))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    from datasets import load_from_disk

    dataset = load_from_disk(str(tmp_path / "datasets" / "tagged"))
    assert sorted(dataset["text"]) == sorted(text.strip() for text in captions.values())
    assert len(dataset) == 8 and all(text.endswith(", 1girl, solo") for text in dataset["text"])
