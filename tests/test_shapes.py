"""The shapes world, its scorer and the pretrained tiny-shapes model that draws it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora.shapes import (
    COLOURS,
    HELD_OUT_SHAPES,
    SHAPES,
    TRAIN_SHAPES,
    TRIGGER,
    Attributes,
    caption,
    demo_scenes,
    demo_set,
    parse_caption,
    render_array,
    scenes,
    vocabulary,
    write_image_folder,
)
from sdlora.shapes_eval import GUIDANCE_SCALE, TARGETS, eval_prompts, sample_and_score
from sdlora.shapes_score import predict, score
from sdlora.tiny_model import TINY_SHAPES_DIR


@pytest.fixture(scope="module")
def tiny_shapes():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_SHAPES_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_scenes_are_pure_functions_of_seed_and_index():
    assert scenes(3, 8) == scenes(3, 8)
    assert scenes(3, 4, start=4) == scenes(3, 8)[4:]
    assert scenes(3, 8) != scenes(4, 8)
    assert np.array_equal(render_array(scenes(3, 8, SHAPES)), render_array(scenes(3, 8, SHAPES)))


def test_scenes_stay_in_their_world():
    drawn = scenes(0, 500)
    assert {s.shape for s in drawn} == set(TRAIN_SHAPES)  # pretraining never sees a held-out shape
    assert all(s.colour != s.background for s in drawn)
    assert {s.colour for s in drawn} == set(COLOURS)
    assert {s.shape for s in demo_scenes("heart", 12)} == {"heart"}


def test_captions_parse_back_to_their_scene():
    for scene in scenes(1, 50, SHAPES):
        for trigger in (None, TRIGGER):
            text = caption(scene, trigger)
            assert parse_caption(text) == Attributes(scene.shape, scene.colour, scene.background), text
    assert caption(demo_scenes("star", 1)[0], TRIGGER).split()[2:4] == [TRIGGER, "star"]
    assert parse_caption("") == Attributes(None, None, None)


def test_scorer_reads_renders_of_every_shape():
    drawn = scenes(2, 64, SHAPES)
    result = score(list(render_array(drawn)), [caption(s) for s in drawn])
    assert (result["shape"], result["colour"], result["background"]) == (1.0, 1.0, 1.0)
    assert result["count"] == 64 and len(result["predictions"]) == 64


def test_scorer_fails_pictures_that_do_not_match():
    drawn = scenes(2, 64, SHAPES)
    shuffled = [caption(s) for s in drawn[1:] + drawn[:1]]  # every picture scored against another's caption
    result = score(list(render_array(drawn)), shuffled)
    assert all(result[k] < 0.5 for k in ("shape", "colour", "background")), result
    blank = predict([np.full((64, 64, 3), 128, np.uint8)])[0]
    assert blank.shape is None and blank.colour is None
    # Not one clean shape: two shapes side by side, clutter around a shape, a shape of scattered colours.
    renders = render_array(scenes(3, 2, SHAPES)).astype(np.float32)
    pair = renders[0].copy()
    pair[:, 32:] = np.roll(renders[0], 32, axis=1)[:, 32:]
    clutter = renders[1].copy()
    clutter[:8] = np.random.default_rng(0).integers(0, 255, size=(8, 64, 3))
    spotted = renders[1].copy()
    spotted[::3, ::3] = 255 - spotted[::3, ::3]
    assert [p.shape for p in predict([renders[0], pair, clutter, spotted])][1:] == [None, None, None]


def test_demo_folder_is_a_training_imagefolder(tmp_path):
    import json

    folder = write_image_folder(tmp_path / "star", demo_set("star", 4, regularisation=2))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all((folder / line["file_name"]).is_file() for line in lines)
    assert all(f" {TRIGGER} star " in line["text"] for line in lines[:4])
    assert all(parse_caption(line["text"]).shape in TRAIN_SHAPES for line in lines[4:])


def test_tiny_shapes_has_the_promised_interfaces(tiny_shapes):
    pipe = tiny_shapes
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8  # 64 px native
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    # Attention at every UNet level: an attention-only LoRA reaches them all.
    assert all(t.startswith("CrossAttn") for t in pipe.unet.config.down_block_types)
    assert all(t.startswith("CrossAttn") for t in pipe.unet.config.up_block_types)
    # Every word is spelled in a few tokens, and the longest captions (a trigger word and the longest
    # names) fit the encoder's 16 tokens untruncated.
    assert all(len(pipe.tokenizer(word).input_ids) <= 6 for word in vocabulary())
    longest = max(
        (caption(s, TRIGGER) for s in scenes(5, 200, SHAPES)), key=lambda c: len(pipe.tokenizer(c).input_ids)
    )
    assert len(pipe.tokenizer(longest).input_ids) <= pipe.tokenizer.model_max_length, longest
    assert set(HELD_OUT_SHAPES) <= set(vocabulary())


def test_tiny_shapes_draws_what_it_is_asked(tiny_shapes):
    result = sample_and_score(tiny_shapes, eval_prompts(32), steps=20, guidance_scale=GUIDANCE_SCALE)
    rates = {k: result[k] for k in TARGETS}
    assert all(rates[k] >= TARGETS[k] for k in TARGETS), rates


def test_random_weights_miss_the_targets(tiny_shapes):
    """The check above can fail: the same pipeline with a random UNet draws noise."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    random_unet = UNet2DConditionModel.from_config(tiny_shapes.unet.config)
    pipe = type(tiny_shapes)(**{**tiny_shapes.components, "unet": random_unet})
    pipe.set_progress_bar_config(disable=True)
    result = sample_and_score(pipe, eval_prompts(16), steps=4, guidance_scale=GUIDANCE_SCALE)
    assert not all(result[k] >= TARGETS[k] for k in TARGETS), result
    assert result["shape"] < 0.6


def test_the_vae_gives_back_the_demo_heart_but_not_the_star(tiny_shapes):
    """Why the demo teaches a heart: a LoRA of the UNet can draw a shape no more often than the VAE decodes
    it cleanly, and tiny-shapes' VAE (trained on every shape) keeps hearts and crosses but blunts stars."""
    from sdlora.shapes_eval import vae_ceiling

    ceilings = {shape: vae_ceiling(tiny_shapes.vae, shape, 32) for shape in ("heart", "cross", "star")}
    assert ceilings["heart"] >= 0.95 and ceilings["cross"] >= 0.95, ceilings
    assert ceilings["star"] <= 0.5, ceilings


def test_a_blob_the_classifier_calls_a_shape_is_no_shape_unless_it_fits_that_shape():
    """The classifier names a shape for any foreground (it is sure of the crescents a heart LoRA draws);
    the picture counts as that shape only if its foreground fits the shape's own outline."""
    import numpy as np

    from sdlora.shapes import PALETTE, SHAPES, Scene, render
    from sdlora.shapes_score import load_classifier, measure_colours, predict, shape_fit

    yy, xx = np.mgrid[:64, :64]
    crescent = ((yy - 30) ** 2 + (xx - 32) ** 2 < 18**2) & ~((yy - 22) ** 2 + (xx - 32) ** 2 < 16**2)
    image = np.where(crescent[..., None], PALETTE["white"], PALETTE["blue"]).astype(np.uint8)
    mask = measure_colours(image.astype(np.float32))[2]
    named = SHAPES[int(load_classifier()(torch.from_numpy(mask)[None, None]).argmax())]
    assert shape_fit(mask > 0.5, named) < 0.65
    assert predict([image])[0].shape is None
    assert predict([image])[0].colour == "white"  # its colours are still read
    for shape in SHAPES:  # while every shape's render fits itself
        drawn = np.asarray(render(Scene(shape, "red", "green", 30.5, 33.0, 37.0)))
        assert predict([drawn])[0].shape == shape
