"""The one image loader: odd formats come out upright 8-bit RGB; bad files are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from image_corpus import invalid, odd_but_valid

from sdlora.images import InvalidImageError, find_images, load_image


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return odd_but_valid(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return invalid(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    "name",
    [
        "cmyk.jpg",
        "gray16.png",
        "gray.png",
        "palette.png",
        "rgba.png",
        "la.png",
        "palette_transparent.png",
        "animated.gif",
        "exif_rotated.jpg",
    ],
)
def test_odd_formats_load_as_8bit_rgb(odd, name):
    image = load_image(odd[name]).image
    assert image.mode == "RGB"
    assert np.asarray(image).dtype == np.uint8


def test_exif_rotation_is_applied(odd):
    loaded = load_image(odd["exif_rotated.jpg"])
    assert loaded.image.size == (64, 80)
    assert "exif_rotated" in loaded.notes


def test_transparency_composited_on_background(odd):
    white = load_image(odd["rgba.png"]).image
    black = load_image(odd["rgba.png"], background=(0, 0, 0)).image
    assert np.asarray(white).min() == 255 and np.asarray(black).max() == 0
    assert "transparency" in load_image(odd["palette_transparent.png"]).notes


def test_sixteen_bit_is_scaled_not_clipped(odd):
    arr = np.asarray(load_image(odd["gray16.png"]).image)[..., 0]
    assert arr.max() > 200 and len(np.unique(arr)) > 100  # clipping would leave almost everything at 255


def test_animation_uses_first_frame(odd):
    loaded = load_image(odd["animated.gif"])
    assert "animated" in loaded.notes
    r, g, b = np.asarray(loaded.image)[0, 0]
    assert b > 200 and g < 50  # the first frame is blue


@pytest.mark.parametrize(
    "name,words",
    [
        ("truncated.png", "corrupt or truncated"),
        ("truncated.jpg", "corrupt or truncated"),
        ("empty.png", "empty file"),
        ("text.jpg", "not an image"),
        ("bomb.png", "decompression bomb"),
    ],
)
def test_bad_files_are_refused_by_name(bad, name, words):
    with pytest.raises(InvalidImageError) as e:
        load_image(bad[name])
    message = str(e.value)
    assert name in message and words in message and "\n" not in message


def test_find_images_is_recursive_and_sorted(tmp_path, odd):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "sub/a.JPG", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["b.png", "sub/a.JPG"]


def test_source_mode_tells_an_opaque_alpha_file_from_rgb(odd, tmp_path):
    """An opaque LA or RGBA file needs no conversion note, yet is not RGB: source_mode says so."""
    from PIL import Image

    Image.new("LA", (8, 8), (100, 255)).save(tmp_path / "opaque_la.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "opaque_rgba.png")
    for name, mode in (("opaque_la.png", "LA"), ("opaque_rgba.png", "RGBA")):
        loaded = load_image(tmp_path / name)
        assert (loaded.notes, loaded.source_mode, loaded.image.mode) == ([], mode, "RGB")
    assert load_image(odd["exif_rotated.jpg"]).source_mode == "RGB"
