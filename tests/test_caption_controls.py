"""Caption controls: trigger words, dropout, tag shuffling and list columns, all pure functions of
(seed, epoch, index) so a resumed run trains on the same captions."""

from __future__ import annotations

from sdlora.caption_controls import CaptionControls

TAGS = "sks, red hair, blue eyes, smiling, outdoors, portrait"


def captions(controls: CaptionControls, raw, epochs=range(6), indices=range(50), seed=0):
    return [controls.caption(raw, seed, e, i) for e in epochs for i in indices]


def test_prefix_and_suffix_put_trigger_words_around_every_caption():
    c = CaptionControls(prefix="sks style,", suffix="masterpiece")
    assert c.caption("a cat", 0, 0, 0) == "sks style, a cat masterpiece"
    assert c.possible_captions(["a cat", "a dog"]) == [
        "sks style, a cat masterpiece",
        "sks style, a dog masterpiece",
    ]


def test_dropout_empties_about_the_given_fraction_and_the_empty_caption_is_cached():
    c = CaptionControls(dropout_rate=0.25)
    out = captions(c, "a cat", indices=range(400))
    assert 0.2 < out.count("") / len(out) < 0.3
    assert set(out) == {"", "a cat"}
    assert c.possible_captions(["a cat"]) == ["", "a cat"]


def test_shuffle_keeps_the_first_tokens_and_every_tag_and_varies_by_epoch():
    c = CaptionControls(shuffle=True, keep_tokens=1)
    assert c.varies_per_epoch
    out = captions(c, TAGS)
    for text in out:
        tags = text.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(TAGS.split(", "))
    assert len(set(out)) > 10
    assert out == captions(c, TAGS)  # deterministic: resume sees the same captions


def test_tag_dropout_never_drops_kept_tokens():
    c = CaptionControls(tag_dropout_rate=0.5, keep_tokens=2)
    out = captions(c, TAGS)
    assert all(t.startswith("sks, red hair") for t in out)
    lengths = {len(t.split(", ")) for t in out}
    assert min(lengths) >= 2 and max(lengths) <= 6 and len(lengths) > 2


def test_list_valued_captions_pick_one_per_example_and_epoch():
    c = CaptionControls()
    raw = ["a cat", "a small cat", "a cat on a mat"]
    out = captions(c, raw, indices=range(30))
    assert set(out) == set(raw)
    assert out == captions(c, raw, indices=range(30))
    assert c.possible_captions([raw, "a dog"]) == sorted([*raw, "a dog"])
    assert all("[" not in text for text in out)  # never a Python repr of the list


def test_no_controls_is_the_caption_as_given():
    c = CaptionControls()
    assert not c.varies_per_epoch
    assert c.caption("  a cat ", 1, 2, 3) == "a cat" and c.caption(None, 1, 2, 3) == ""


def test_tag_frequency_counts_tags_as_trained():
    c = CaptionControls(prefix="sks")
    freq = c.tag_frequency(["red, blue", "red", ["red, green", "blue"]])
    assert freq == {"sks": 4, "red": 3, "blue": 2, "green": 1}
