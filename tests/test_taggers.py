"""WD booru taggers on a tiny ONNX tagger exported here: the tags written, checked against the model's raw
scores run and thresholded in the test itself, the preprocessing, and generate_captions.py end to end."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from captioning_tools import HAND_WRITTEN, add_bad_images, caption, ok
from PIL import Image

from sdlora.captions import read_captions_json, read_txt_captions
from sdlora.errors import UserError
from sdlora.images import find_images, load_image

ort = pytest.importorskip("onnxruntime")  # optional dependencies: the tagger tests need them, the toolkit not
pytest.importorskip("onnxscript")  # torch.onnx's exporter, for the tiny tagger

from sdlora.taggers import (  # noqa: E402
    display_name,
    load_tagger,
    onnx_providers,
    prepare_image,
    read_selected_tags,
)


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    from sdlora.tiny_captioners import save_tiny_captioner

    return save_tiny_captioner("wd-tagger", tmp_path_factory.mktemp("tagger") / "wd-tagger")


def expected_tags(tagger_dir: Path, paths: list[Path], general=0.35, character=0.35, undesired=(),
                  underscores=False, rating=False) -> dict[Path, str]:  # fmt: skip
    """The tags each image should get, computed here from the ONNX model's raw scores, one image at a time."""
    session = ort.InferenceSession(str(tagger_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    size = model_input.shape[1]
    with open(tagger_dir / "selected_tags.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    result = {}
    for path in paths:
        rgb = np.asarray(load_image(path).image)
        h, w = rgb.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        square = np.pad(rgb, ((top, side - h - top), (left, side - w - left), (0, 0)), constant_values=255)
        resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC), dtype=np.float32)
        scores = session.run(None, {model_input.name: resized[None, :, :, [2, 1, 0]]})[0][
            0
        ]  # BGR, batch of 1
        picked, ratings = [], []
        for row, score in zip(rows, scores):
            name, category = row["name"], int(row["category"])
            shown = (
                name.replace("_", " ") if underscores and len(name) > 3 else name
            )  # no longer kaomoji here
            if name in undesired or shown in undesired:
                continue
            if category == 9:
                ratings.append((score, shown))
            elif score >= {0: general, 4: character}[category]:
                picked.append((score, shown))
        tags = [tag for _, tag in sorted(picked, key=lambda pair: -pair[0])]
        if rating and ratings:
            tags.insert(0, max(ratings)[1])
        result[path.resolve()] = ", ".join(tags)
    return result


def scores_straddle(tagger_dir: Path, paths: list[Path], threshold: float) -> bool:
    """Whether the images' general-tag scores fall on both sides of threshold (else a test of it is vacuous)."""
    tagger = load_tagger(str(tagger_dir))
    scores = tagger.scores([load_image(p).image for p in paths])[:, tagger.tags.categories == 0]
    return bool((scores >= threshold).any() and (scores < threshold).any())


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], {}),
        (
            ["--general_threshold", "0.6", "--character_threshold", "0.2", "--replace_underscores",
             "--include_rating", "--undesired_tags", "solo, long hair,hatsune_miku"],
            {"general": 0.6, "character": 0.2, "underscores": True, "rating": True,
             "undesired": ("solo", "long hair", "hatsune_miku")},
        ),
        (["--general_threshold", "0.9", "--character_threshold", "0.9"], {"general": 0.9, "character": 0.9}),
    ],
)  # fmt: skip
def test_tags_match_an_independent_computation_from_raw_scores(sample_data, tagger_dir, flags, expected):
    images_dir = sample_data / "images"
    output = sample_data / "tags.json"
    ok(caption("--images_dir", str(images_dir), "--output_file", str(output), "--batch_size", "3",
               "--model_name_or_path", str(tagger_dir), *flags))  # fmt: skip

    written = {p.resolve(): text for p, text in read_captions_json(output).items()}
    paths = find_images(images_dir)
    wanted = expected_tags(tagger_dir, paths, **expected)
    assert written == {p: tags for p, tags in wanted.items() if tags}  # an image without tags gets no caption
    assert scores_straddle(tagger_dir, paths, expected.get("general", 0.35))


def test_undesired_and_rating_tags_would_otherwise_be_written(sample_data, tagger_dir):
    paths = find_images(sample_data / "images")
    plain = expected_tags(tagger_dir, paths, general=0.6, character=0.2, underscores=True)
    assert any("solo" in tags.split(", ") for tags in plain.values())
    assert any("hatsune miku" in tags.split(", ") for tags in plain.values())
    assert not any(
        tags.split(", ")[0] in ("general", "sensitive", "questionable", "explicit") for tags in plain.values()
    )


def test_preprocessing_pads_on_white_resizes_and_flips_to_bgr():
    red = Image.new("RGB", (80, 40), (255, 0, 0))  # wide: padded above and below
    prepared = prepare_image(red, 40)
    assert prepared.shape == (40, 40, 3) and prepared.dtype == np.float32
    assert prepared[0, 20].tolist() == [255.0, 255.0, 255.0]  # white padding
    assert prepared[20, 20].tolist() == [0.0, 0.0, 255.0]  # red in BGR order, in 0..255
    assert prepared[39, 20].tolist() == [255.0, 255.0, 255.0]


def test_input_size_is_read_from_the_onnx_model(tagger_dir):
    tagger = load_tagger(str(tagger_dir))
    assert tagger.size == 40 and tagger.fixed_batch is None
    assert "CPUExecutionProvider" in tagger.describe()


def test_batched_tags_equal_unbatched(sample_data, tagger_dir):
    tagger = load_tagger(str(tagger_dir))
    images = [load_image(p).image for p in find_images(sample_data / "images")]
    one_by_one = [tagger.caption([image])[0] for image in images]
    assert tagger.caption(images) == one_by_one and len(set(one_by_one)) > 1


def test_a_model_exported_for_a_fixed_batch_runs_in_chunks(sample_data, tagger_dir, tmp_path):
    import onnx

    # Older WD exports take batches of one size only; onnxruntime refuses any other.
    fixed_dir = shutil.copytree(tagger_dir, tmp_path / "fixed")
    model = onnx.load(str(fixed_dir / "model.onnx"))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 3
    onnx.save(model, str(fixed_dir / "model.onnx"))
    fixed = load_tagger(str(fixed_dir))
    images = [load_image(p).image for p in find_images(sample_data / "images")]  # 8: chunks of 3, 3 and 2
    assert fixed.fixed_batch == 3
    assert fixed.caption(images) == load_tagger(str(tagger_dir)).caption(images)


def test_kaomoji_keep_their_underscores():
    assert display_name("long_hair", True) == "long hair" and display_name("long_hair", False) == "long_hair"
    for face in ("^_^", "o_o", "(o)_(o)", "<o>_<o>", "||_||"):
        assert display_name(face, True) == face


def test_missing_onnxruntime_is_a_one_line_error(sample_data, tagger_dir, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "onnxruntime", None
    )  # what `import onnxruntime` meets when not installed
    with pytest.raises(UserError, match="pip install onnxruntime"):
        load_tagger(str(tagger_dir))
    result = caption("--images_dir", str(sample_data / "images"), "--model_name_or_path", str(tagger_dir),
                     "--output_file", str(sample_data / "t.json"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: booru taggers run on onnxruntime, which is not installed; pip install onnxruntime "
        "(or onnxruntime-gpu for a CUDA GPU)"
    ]


def test_providers_follow_the_device():
    cpu_only, with_cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert onnx_providers("cpu", with_cuda) == ["CPUExecutionProvider"]
    assert onnx_providers("auto", with_cuda)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert onnx_providers("cuda:1", with_cuda)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    with pytest.raises(UserError, match="pip install onnxruntime-gpu"):
        onnx_providers("cuda", cpu_only)


def test_a_tag_list_that_does_not_fit_the_model_is_refused(tagger_dir, tmp_path):
    broken = shutil.copytree(tagger_dir, tmp_path / "broken")
    lines = (broken / "selected_tags.csv").read_text(encoding="utf-8").splitlines()
    (broken / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="20 tags for a model with 21 outputs"):
        load_tagger(str(broken))
    (broken / "selected_tags.csv").write_text("id,tag\n1,a\n", encoding="utf-8")
    with pytest.raises(UserError, match="not a tagger's selected_tags.csv"):
        read_selected_tags(broken / "selected_tags.csv")


def test_tagger_end_to_end_resumes_byte_for_byte_and_skips_bad_images(sample_data, tagger_dir):
    images_dir = sample_data / "images"
    bad = add_bad_images(images_dir)
    first = find_images(images_dir)[0]
    first.with_suffix(".txt").write_bytes(HAND_WRITTEN.encode() + b"\r\n")  # a Windows editor's line end
    args = ["--images_dir", str(images_dir), "--format", "txt", "--model_name_or_path", str(tagger_dir)]

    result = ok(caption(*args, "--prefix", "sks,", "--replace_underscores"))

    assert "(wd-tagger)" in result.stdout and "skipped 2 unreadable images" in result.stdout
    assert all(name in result.stdout for name in bad)
    assert first.with_suffix(".txt").read_bytes() == HAND_WRITTEN.encode() + b"\r\n"  # untouched
    captions = read_txt_captions(images_dir)
    good = [p for p in find_images(images_dir) if p.name not in bad]
    assert set(captions) == set(good)
    wanted = expected_tags(tagger_dir, good[1:], underscores=True)
    assert all(captions[p] == f"sks, {wanted[p.resolve()]}\n" for p in good[1:])


def test_tagger_refuses_generation_flags(sample_data, tagger_dir):
    args = ["--images_dir", str(sample_data / "images"), "--model_name_or_path", str(tagger_dir)]
    assert "takes no text prompt" in caption(*args, "--prompt", "a photo of").stderr
    assert "generates no text" in caption(*args, "--num_beams", "3").stderr
