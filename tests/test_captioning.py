"""Captioning: the library on tiny BLIP-2, BLIP and ViT-GPT2 models, and generate_captions.py end to end.
(Florence-2 and VLMs: test_florence_and_vlms.py; taggers: test_taggers.py; tags with a sentence:
test_caption_combining.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdlora.caption_output import CaptionOutput, open_caption_output
from sdlora.captioner_families import GenerationSettings
from sdlora.captioning import add_trigger_words, caption_images, load_captioner
from sdlora.captions import read_captions_json, read_metadata_jsonl, read_txt_captions
from sdlora.errors import UserError
from sdlora.images import find_images, load_image

KINDS = ("blip2", "blip", "vit-gpt2")
FAST = ["--num_beams", "2", "--max_new_tokens", "5"]  # short captions: a script run is then mostly imports
GREEDY = GenerationSettings(num_beams=1, max_new_tokens=5)


@pytest.fixture(scope="module")
def captioners(tmp_path_factory) -> dict[str, Path]:
    """The three tiny captioning models, built once for this file."""
    from sdlora.tiny_captioners import save_tiny_captioners

    return save_tiny_captioners(tmp_path_factory.mktemp("captioners"), kinds=KINDS)


@pytest.fixture(scope="module")
def loaded(captioners) -> dict:
    """The tiny models loaded for greedy decoding of 5 tokens."""
    return {kind: load_captioner(str(path), generation=GREEDY) for kind, path in captioners.items()}


def run_script(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(repo / "generate_captions.py"), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_image_gets_a_caption_with_trigger_words(repo, sample_data, captioners, kind):
    output = sample_data / "out" / "captions.json"
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(output), *FAST]
    args += ["--model_name_or_path", str(captioners[kind]), "--prefix", "sks dog,", "--suffix", "x"]
    ok(run_script(repo, *args))

    data = json.loads(output.read_text(encoding="utf-8"))
    images = find_images(sample_data / "images")
    # The documented format: paths relative to the file's folder, one caption string each.
    assert sorted(data) == sorted(Path(os.path.relpath(p, output.parent)).as_posix() for p in images)
    for caption in data.values():
        assert caption.startswith("sks dog, ") and caption.endswith(" x")
        words = caption[len("sks dog, ") : -len(" x")]
        assert words.strip() and "\n" not in caption and "  " not in caption
    assert len(read_captions_json(output)) == len(images)


@pytest.mark.slow
def test_resume_skips_captioned_images_and_overwrite_redoes_them(repo, sample_data, captioners):
    images = find_images(sample_data / "images")
    output = sample_data / "captions.json"
    output.write_text(json.dumps({f"images/{images[0].name}": "my own caption"}), encoding="utf-8")
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(output)]
    args += ["--model_name_or_path", str(captioners["blip"]), *FAST]

    resumed = ok(run_script(repo, *args)).stdout
    assert f"{len(images) - 1} of {len(images)} images to caption (1 already captioned" in resumed
    assert f"captioned {len(images) - 1} images" in resumed
    captions = read_captions_json(output)
    assert captions[sample_data / "images" / images[0].name] == "my own caption"
    assert len(captions) == len(images)

    again = ok(run_script(repo, *args)).stdout
    assert f"0 of {len(images)} images to caption" in again and "model:" not in again

    redone = ok(run_script(repo, *args, "--overwrite")).stdout
    assert f"captioned {len(images)} images" in redone
    assert read_captions_json(output)[sample_data / "images" / images[0].name] != "my own caption"


@pytest.mark.parametrize("kind", KINDS)
def test_batch_size_does_not_change_greedy_captions(sample_data, loaded, tmp_path, kind):
    images = find_images(sample_data / "images")
    results = []
    for batch_size in (1, 4):
        output = open_caption_output("json", sample_data / "images", tmp_path / f"b{batch_size}.json")
        caption_images(loaded[kind], images, output, batch_size=batch_size)
        results.append(read_captions_json(output.path))
    assert results[0] == results[1]
    assert len(results[0]) == len(images) and all(results[0].values())
    assert len(set(results[0].values())) > 1  # captions depend on the image: a batch mix-up would show


@pytest.mark.slow
def test_unreadable_images_are_listed_and_skipped(repo, sample_data, captioners):
    images_dir = sample_data / "images"
    (images_dir / "x.png").write_text("not an image", encoding="utf-8")
    png = (images_dir / "red_circle.png").read_bytes()
    (images_dir / "nested").mkdir()
    (images_dir / "nested" / "truncated.png").write_bytes(png[: len(png) // 2])
    output = sample_data / "captions.json"
    args = ["--images_dir", str(images_dir), "--output_file", str(output), "--batch_size", "3"]

    result = ok(run_script(repo, *args, "--model_name_or_path", str(captioners["vit-gpt2"]), *FAST))

    assert "skipped 2 unreadable images" in result.stdout
    assert "x.png: not an image" in result.stdout and "truncated.png: corrupt or truncated" in result.stdout
    captions = read_captions_json(output)
    assert set(captions) == {p for p in find_images(images_dir) if p.name not in ("x.png", "truncated.png")}
    assert all(captions.values())


@pytest.mark.slow
def test_jsonl_output_reads_back_as_imagefolder_metadata(repo, sample_data, captioners, tmp_path, tiny_model):
    images_dir = sample_data / "images"
    ok(
        run_script(
            repo,
            "--images_dir",
            str(images_dir),
            "--format",
            "jsonl",
            "--model_name_or_path",
            str(captioners["blip2"]),
            *FAST,
        )
    )

    captions = read_metadata_jsonl(images_dir / "metadata.jsonl")
    assert set(captions) == set(find_images(images_dir)) and all(captions.values())
    # create_dataset.py reads it as captions (with the test's tiny model: nothing is built in the repository).
    result = subprocess.run(
        [sys.executable, "create_dataset.py", "--images_dir", str(images_dir), "--captions_file",
         str(images_dir / "metadata.jsonl"), "--output_dir", str(tmp_path / "dataset"),
         "--pretrained_model_name_or_path", str(tiny_model)],
        cwd=repo, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ok(result)
    from datasets import load_from_disk

    dataset = load_from_disk(tmp_path / "dataset" / "Text2Image_example")
    assert sorted(dataset["text"]) == sorted(captions.values())


@pytest.mark.slow
def test_txt_output_reads_back_as_caption_files(repo, sample_data, captioners):
    images_dir = sample_data / "images"
    ok(
        run_script(
            repo,
            "--images_dir",
            str(images_dir),
            "--format",
            "txt",
            "--model_name_or_path",
            str(captioners["blip"]),
            *FAST,
        )
    )

    captions = read_txt_captions(images_dir)
    assert set(captions) == set(find_images(images_dir))
    assert all(text.strip() and text.count("\n") == 1 for text in captions.values())


@pytest.mark.slow
def test_malformed_output_file_is_an_error_and_left_untouched(repo, sample_data, captioners):
    output = sample_data / "captions.json"
    output.write_text('{"images/red_circle.png": "a red', encoding="utf-8")
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(output)]

    result = run_script(repo, *args, "--model_name_or_path", str(captioners["blip"]), *FAST)

    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith(f"error: {output}: invalid JSON")
        and "Traceback" not in result.stderr
    )
    assert output.read_text(encoding="utf-8") == '{"images/red_circle.png": "a red'


@pytest.mark.slow
def test_offline_hub_id_is_one_line_error(repo, sample_data):
    result = run_script(
        repo, "--images_dir", str(sample_data / "images"), "--output_file", str(sample_data / "c.json")
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: Salesforce/blip2-opt-2.7b: not in the Hugging Face cache and the Hub cannot be reached (offline?); "
        "download it once while online, or pass a local model folder"
    )


def test_folder_that_is_not_a_captioning_model_is_refused(tiny_model, tmp_path):
    with pytest.raises(UserError, match="not a captioning model \\(no config.json, no model.onnx"):
        load_captioner(str(tiny_model))  # a Stable Diffusion folder: model_index.json, no config.json
    with pytest.raises(UserError, match="a config.json without model_type is not a captioning model"):
        load_captioner(str(tiny_model / "unet"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}), encoding="utf-8")
    with pytest.raises(UserError, match="model_type 'clip' is not a captioning model"):
        load_captioner(str(tmp_path))


@pytest.mark.parametrize("kind", ["blip2", "blip"])
def test_prompt_is_not_left_in_the_caption(sample_data, loaded, kind):
    captioner = loaded[kind]
    images = [load_image(p).image for p in find_images(sample_data / "images")[:2]]
    prompt = "a photo of"
    captions = replace(
        captioner, settings=GenerationSettings(prompt=prompt, num_beams=1, max_new_tokens=6)
    ).caption(images)

    # What the model generated in full, prompt included: the caption must be exactly the rest.
    inputs = captioner.processor(images=images, text=[prompt] * 2, return_tensors="pt")
    with torch.inference_mode():
        output = captioner.model.generate(**inputs, num_beams=1, max_new_tokens=6, min_new_tokens=1)
    for caption, full in zip(captions, captioner.tokenizer.batch_decode(output, skip_special_tokens=True)):
        assert caption and not caption.startswith(prompt)
        # Spaces and BERT's "##" word-piece marks depend on where decoding starts; the text may not.
        assert full.replace(" ", "") == (prompt + caption).replace(" ", "").replace("##", "")


def test_vit_gpt2_refuses_a_prompt(repo, sample_data, captioners):
    result = run_script(repo, "--images_dir", str(sample_data / "images"), "--output_file", str(sample_data / "c.json"),
                        "--model_name_or_path", str(captioners["vit-gpt2"]), "--prompt", "a photo of")  # fmt: skip
    assert result.returncode == 2 and "takes no text prompt" in result.stderr
    assert "model:" not in result.stdout and not (sample_data / "c.json").exists()  # refused before loading


def test_captions_are_saved_every_save_every_batches(sample_data, loaded, tmp_path):
    images = find_images(sample_data / "images")[:5]
    # On disk after each batch of 2; the last, odd batch is written when the run ends.
    for save_every, expected in ((1, [2, 4, 5]), (2, [0, 4, 4])):
        output = open_caption_output("json", sample_data / "images", tmp_path / f"every{save_every}.json")
        on_disk = []

        def count_saved(_n, path=output.path, on_disk=on_disk):
            on_disk.append(len(read_captions_json(path)) if path.exists() else 0)

        caption_images(
            loaded["blip"], images, output, batch_size=2, save_every=save_every, progress=count_saved
        )
        assert on_disk == expected
        assert len(read_captions_json(output.path)) == 5


def test_interrupt_keeps_the_captions_of_finished_batches(sample_data, loaded, tmp_path):
    images = find_images(sample_data / "images")

    class InterruptedOnThirdBatch:
        """The real tiny captioner, with Ctrl-C pressed while the third batch is generating."""

        def __init__(self, captioner):
            self.captioner, self.calls = captioner, 0

        def caption(self, batch):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.captioner.caption(batch)

    output = open_caption_output("json", sample_data / "images", tmp_path / "out" / "captions.json")
    with pytest.raises(KeyboardInterrupt):
        caption_images(InterruptedOnThirdBatch(loaded["blip"]), images, output, batch_size=2, save_every=10)
    assert {p.resolve() for p in read_captions_json(output.path)} == {p.resolve() for p in images[:4]}
    assert [p.name for p in output.path.parent.iterdir()] == [
        "captions.json"
    ]  # no temporary file left behind


def test_an_empty_caption_is_reported_and_not_written(sample_data, loaded, tmp_path):
    images = find_images(sample_data / "images")[:3]

    class SilentOnFirstImage:
        """The real tiny captioner, except that it finds no words for the first image."""

        def caption(self, batch):
            return [""] + loaded["blip"].caption(batch)[1:]

    output = open_caption_output("json", sample_data / "images", tmp_path / "out.json")
    run = caption_images(SilentOnFirstImage(), images, output, batch_size=4)
    assert run.empty == [images[0]] and (run.generated, run.written) == (3, 2)
    assert set(read_captions_json(output.path)) == set(images[1:])


def test_trigger_words_are_joined_by_single_spaces():
    assert add_trigger_words("a dog on a sofa", "sks dog,", "") == "sks dog, a dog on a sofa"
    assert add_trigger_words("a dog", " ohwx\n", " , film grain ") == "ohwx a dog , film grain"
    assert add_trigger_words("a dog") == "a dog"


def test_jsonl_with_other_columns_is_not_rewritten(sample_data):
    metadata = sample_data / "images" / "metadata.jsonl"
    metadata.write_text('{"file_name": "red_circle.png", "text": "a", "score": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match="columns besides file_name and text \\(score\\)"):
        open_caption_output("jsonl", sample_data / "images", None)


def test_existing_captions_match_images_however_the_folder_is_named(sample_data, monkeypatch):
    monkeypatch.chdir(sample_data)
    output = open_caption_output("json", "images", sample_data / "image_captions.json")  # the sample captions
    assert all(output.has(p) for p in find_images(sample_data / "images"))
    assert all(output.has(p) for p in find_images("./images"))
    assert isinstance(output, CaptionOutput) and output.unsaved == {}


def test_device_and_dtype_default_to_cuda_fp16_else_cpu_fp32():
    from sdlora.devices import pick_device

    device, dtype = pick_device("auto", "auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype == (torch.float16 if device.type == "cuda" else torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UserError, match="float16 on the CPU"):
        pick_device("cpu", "float16")


def test_tiny_captioners_are_deterministic_for_a_seed():
    from sdlora.tiny_captioners import TINY_CAPTIONERS

    for build in TINY_CAPTIONERS.values():
        first, second, other = (build(seed)[0].state_dict() for seed in (0, 0, 1))
        assert all(torch.equal(first[k], second[k]) for k in first)
        assert not all(torch.equal(first[k], other[k]) for k in first)
