"""Florence-2 and vision-language models (through their chat template) on tiny random-weight models: the real
loading and generation paths, checked against transformers run by hand, and generate_captions.py end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from captioning_tools import HAND_WRITTEN, add_bad_images, caption, ok, run_command
from PIL import Image

from sdlora.caption_output import open_caption_output
from sdlora.captioner_families import FLORENCE_TASKS, GenerationSettings
from sdlora.captioning import caption_images, load_captioner
from sdlora.captions import clean_caption, read_captions_json, read_metadata_jsonl
from sdlora.errors import UserError
from sdlora.images import find_images, load_image
from sdlora.vlm_captioner import clean_answer, render_prompt

GREEDY = GenerationSettings(num_beams=1, max_new_tokens=6)
FAST = ["--max_new_tokens", "5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from sdlora.tiny_captioners import save_tiny_captioners

    return save_tiny_captioners(tmp_path_factory.mktemp("vlms"), kinds=("florence2", "llava"))


@pytest.fixture(scope="module")
def florence(models):
    return load_captioner(str(models["florence2"]), generation=GREEDY)


@pytest.fixture(scope="module")
def llava(models):
    return load_captioner(str(models["llava"]), generation=GREEDY)


@pytest.fixture
def images(sample_data) -> list[Image.Image]:
    return [load_image(p).image for p in find_images(sample_data / "images")]


def test_family_is_read_from_the_config(florence, llava):
    assert (florence.kind, llava.kind) == ("florence2", "vlm")


@pytest.mark.parametrize("task", FLORENCE_TASKS)
def test_florence_caption_is_the_task_answer_transformers_gives(florence, images, task):
    captioner = replace(florence, settings=replace(GREEDY, task=task))
    captions = captioner.caption(images[:3])

    # By hand, one image at a time as the Florence-2 model card does it: the task token through the processor,
    # generate, decode with the special tokens, post_process_generation.
    processor, expected = florence.processor, []
    for image in images[:3]:
        inputs = processor(images=image, text=task, return_tensors="pt")
        assert task not in processor.decode(inputs["input_ids"][0])  # the processor's instruction instead
        with torch.inference_mode():
            output = florence.model.generate(**inputs, num_beams=1, max_new_tokens=6, do_sample=False)
        text = processor.batch_decode(output, skip_special_tokens=False)[0]
        expected.append(
            clean_caption(processor.post_process_generation(text, task=task, image_size=image.size)[task])
        )
    assert captions == expected and all(captions)


def test_florence_tasks_ask_different_questions(florence, images):
    answers = {
        task: replace(florence, settings=replace(GREEDY, task=task)).caption(images[:2])
        for task in FLORENCE_TASKS
    }
    assert len({tuple(a) for a in answers.values()}) == len(FLORENCE_TASKS)


@pytest.mark.parametrize("name", ["florence", "llava"])
def test_batched_captions_equal_unbatched(request, sample_data, tmp_path, name):
    captioner = request.getfixturevalue(name)
    paths = find_images(sample_data / "images")
    results = []
    for batch_size in (1, 3):
        output = open_caption_output("json", sample_data / "images", tmp_path / f"b{batch_size}.json")
        caption_images(captioner, paths, output, batch_size=batch_size)
        results.append(read_captions_json(output.path))
    assert results[0] == results[1] and len(results[0]) == len(paths)
    assert len(set(results[0].values())) > 1  # captions depend on the image: a batch mix-up would show


def test_vlm_answer_is_what_follows_the_prompt(llava, images):
    prompt = llava.prompt
    assert "Write a one-sentence caption for this image." in prompt and "<image>" in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")  # the generation prompt
    inputs = llava.processor(images=images[:1], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        output = llava.model.generate(**inputs, num_beams=1, max_new_tokens=6, do_sample=False)
    answer = llava.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert llava.caption(images[:1]) == [clean_answer(answer)]


def test_vlm_prompts_of_different_lengths_are_padded_on_the_left(llava, images):
    short = render_prompt(llava.processor, "Caption.")
    long = render_prompt(llava.processor, "Write a long and careful caption for this image, please.")
    together = llava.answer(images[:2], [short, long])
    alone = llava.answer(images[:1], [short]) + llava.answer(images[1:2], [long])
    assert together == alone and all(together)


def test_vlm_decodes_greedily_though_the_model_ships_sampling_defaults(llava, images):
    assert llava.model.generation_config.do_sample  # as Qwen2.5-VL and JoyCaption ship
    assert llava.caption(images) == llava.caption(images)
    sampled = replace(llava, settings=replace(GREEDY, do_sample=True, temperature=1.5, max_new_tokens=12))
    torch.manual_seed(0)
    first = sampled.caption(images)
    assert first != sampled.caption(images)  # --do_sample does sample


@pytest.mark.parametrize(
    "answer, caption",
    [
        ("assistant\nA red circle on a blue background.  ", "A red circle on a blue background."),
        ('Assistant: "A red circle."', "A red circle."),
        ("Caption: a cat on a sofa", "a cat on a sofa"),
        ("\u201ca dog in the snow\u201d\n", "a dog in the snow"),
        ("model\nA boat", "A boat"),
        ("An assistant at work", "An assistant at work"),  # a word, not a role name
        ('a sign that says "stop"', 'a sign that says "stop"'),  # quotes inside stay
    ],
)
def test_chat_formatting_is_cleaned_from_answers(answer, caption):
    assert clean_answer(answer) == caption


def test_prompt_rendering_follows_what_the_template_takes(llava):
    processor = llava.processor
    system = render_prompt(processor, "Describe.", system_prompt="You are a helpful image captioner.")
    assert (
        system.index("You are a helpful image captioner.")
        < system.index("<image>")
        < system.index("Describe.")
    )

    # JoyCaption-style: the template takes the text as a string and places the image itself.
    string_only = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}<image>{{ m['content'] }}"
        "{% endif %}\n{% endfor %}assistant: "
    )
    joy = replace_template(processor, string_only)
    assert render_prompt(joy, "Describe.").startswith("user: <image>Describe.")
    assert (
        render_prompt(replace_template(processor, None), "caption en") == "caption en"
    )  # PaliGemma: no template
    with pytest.raises(UserError, match="puts no image in the prompt"):
        render_prompt(replace_template(processor, "{{ messages[0]['role'] }}"), "Describe.")


def replace_template(processor, template):
    import copy

    other = copy.copy(processor)
    other.chat_template = template
    return other


def test_remote_code_florence_checkpoint_is_refused_with_its_converted_name(tmp_path):
    config = {"model_type": "florence2", "vision_config": {"model_type": "davit"}, "auto_map": {}}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError, match="florence-community/Florence-2-base"):
        load_captioner(str(tmp_path))


def test_florence_end_to_end_resumes_and_skips_bad_images(sample_data, models):
    images_dir = sample_data / "images"
    bad = add_bad_images(images_dir)
    first = find_images(images_dir)[0]
    output = sample_data / "captions.jsonl"
    output.write_text(
        json.dumps({"file_name": f"images/{first.name}", "text": HAND_WRITTEN}) + "\n", encoding="utf-8"
    )

    result = ok(caption("--images_dir", str(images_dir), "--format", "jsonl", "--output_file", str(output),
                        "--model_name_or_path", str(models["florence2"]), "--task", "<DETAILED_CAPTION>", *FAST))  # fmt: skip

    assert "task <DETAILED_CAPTION>" in result.stdout and "skipped 2 unreadable images" in result.stdout
    assert all(name in result.stdout for name in bad)
    captions = read_metadata_jsonl(output)
    assert captions[first] == HAND_WRITTEN  # kept as written
    good = {p for p in find_images(images_dir) if p.name not in bad}
    assert set(captions) == good and all(captions.values())


def test_vlm_end_to_end_with_prompt_and_trigger_words(sample_data, models):
    images_dir = sample_data / "images"
    output = sample_data / "out" / "captions.json"
    args = [
        "--images_dir",
        str(images_dir),
        "--output_file",
        str(output),
        "--model_name_or_path",
        str(models["llava"]),
    ]
    result = ok(
        caption(*args, "--prompt", "Describe it.", "--system_prompt", "Be brief.", "--prefix", "ohwx,", *FAST)
    )

    assert "(vlm)" in result.stdout and "prompt 'Describe it.'" in result.stdout
    captions = read_captions_json(output)
    assert {p.resolve() for p in captions} == {p.resolve() for p in find_images(images_dir)}
    assert all(text.startswith("ohwx, ") and len(text) > len("ohwx, ") for text in captions.values())
    again = ok(caption(*args, *FAST))
    assert "0 of 8 images to caption" in again.stdout and read_captions_json(output) == captions


def test_flags_a_family_cannot_take_are_refused_before_loading(sample_data, models):
    args = ["--images_dir", str(sample_data / "images"), "--output_file", str(sample_data / "c.json")]
    florence_prompt = caption(
        *args, "--model_name_or_path", str(models["florence2"]), "--prompt", "a photo of"
    )
    assert florence_prompt.returncode == 2 and "takes no text prompt" in florence_prompt.stderr
    assert "--task" in florence_prompt.stderr
    vlm_task = caption(*args, "--model_name_or_path", str(models["llava"]), "--task", "<CAPTION>")
    assert vlm_task.returncode == 2 and "only Florence-2 takes a task" in vlm_task.stderr
    thresholds = caption(*args, "--model_name_or_path", str(models["llava"]), "--general_threshold", "0.5")
    assert thresholds.returncode == 2 and "--general_threshold: for booru taggers" in thresholds.stderr
    assert not (sample_data / "c.json").exists()


@pytest.mark.slow
def test_the_command_line_captions_with_a_vlm(sample_data, models):
    output = sample_data / "c.json"
    result = run_command("generate_captions.py", "--images_dir", str(sample_data / "images"), "--output_file",
                         str(output), "--model_name_or_path", str(models["llava"]), "--batch_size", "4", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(read_captions_json(output)) == 8 and "Traceback" not in result.stderr
