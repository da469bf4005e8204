"""The typed configuration: flags, config files (TOML, JSON, YAML) and their precedence, the checks, the
resolved config.toml a run writes (which re-runs it bit for bit), and the launcher's recipe files."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import REPO, same_weights, train

from sdlora.config import TrainConfig, parse_train_config
from sdlora.config.flags import flat_values, resume_values, to_toml

DATA = ["--dataset_from_disk"]


def test_defaults_file_and_command_line_in_that_order(tmp_path):
    defaults = parse_train_config("", DATA)
    assert defaults.adapter.rank == 4 and defaults.optimization.learning_rate == 1e-4
    assert defaults.cache.cache_text_embeddings is True and defaults.cache.cache_latents is None
    (tmp_path / "r.toml").write_text(
        'rank = 16\nlearning_rate = 3e-4\nlora_target_modules = ["to_q", "to_v"]\n'
    )
    from_file = parse_train_config("", [*DATA, "--config", str(tmp_path / "r.toml")])
    assert from_file.adapter.rank == 16 and from_file.optimization.learning_rate == 3e-4
    assert from_file.adapter.lora_target_modules == ("to_q", "to_v")
    both = parse_train_config(
        "", [*DATA, "--config", str(tmp_path / "r.toml"), "--rank", "8", "--no-cache_latents"]
    )
    assert (
        both.adapter.rank == 8
        and both.optimization.learning_rate == 3e-4
        and both.cache.cache_latents is False
    )
    (tmp_path / "r.json").write_text(json.dumps({"rank": 2, "conv_dim": 3}))  # kohya's name for conv_rank
    (tmp_path / "r.yaml").write_text("rank: 2\nrandom_flip: true\n")
    assert parse_train_config("", [*DATA, "--config", str(tmp_path / "r.json")]).adapter.conv_rank == 3
    assert parse_train_config("", [*DATA, "--config", str(tmp_path / "r.yaml")]).data.random_flip is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        both.adapter.rank = 1  # read-only once resolved


@pytest.mark.parametrize(
    "text,message",
    [
        ("rnak = 4\n", "unknown setting 'rnak'"),
        ('rank = "four"\n', "rank = 'four' is not a int"),
        ('lora_layers = "everything"\n', "use one of attn, attn_ff, all"),
        ("rank = [\n", "not a readable config file"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        parse_train_config("", [*DATA, "--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {path}" in err and message in err


def test_every_recipe_is_a_valid_config(tmp_path):
    recipes = sorted((REPO / "recipes").glob("*.toml"))
    assert [p.stem for p in recipes] == ["sd15", "sd21", "sd35", "sdxl", "tiny-shapes", "tiny"]
    for recipe in recipes:
        cfg = parse_train_config("", [*DATA, "--config", str(recipe)])
        if recipe.stem == "tiny-shapes":  # the learning benchmark's default row, seed 0 (no flips there)
            assert (
                cfg.optimization.seed == 0
                and cfg.data.resolution == 64
                and cfg.optimization.max_train_steps == 300
            )
        else:
            assert cfg.optimization.seed == 42 and cfg.data.random_flip
    assert parse_train_config(
        "", [*DATA, "--config", str(REPO / "recipes/sdxl.toml")]
    ).speed.gradient_checkpointing


def test_the_written_config_reads_back_as_the_same_configuration(tmp_path):
    cfg = parse_train_config(
        "", [*DATA, "--rank", "8", "--caption_prefix", 'sks "quoted", ünïcode', "--hub_token", "x"]
    )
    text = to_toml(flat_values(cfg, include_per_run=False), "a header\nof two lines")
    assert "hub_token" not in text and "resume_from_checkpoint" not in text  # no secret, no per-run choice
    (tmp_path / "c.toml").write_text(text)
    again = parse_train_config("", ["--config", str(tmp_path / "c.toml")])
    assert flat_values(again, include_per_run=False) == flat_values(cfg, include_per_run=False)


def test_every_flag_that_shapes_training_is_in_the_resume_check():
    from sdlora.config.flags import section_fields, sections_of

    values = resume_values(parse_train_config("", DATA))
    sections = dict(sections_of(TrainConfig))
    for name in ("adapter", "objective", "captions", "buckets"):  # every field shapes the data or the adapter
        fields = {f.name for f, _, _ in section_fields(sections[name])}
        assert fields - {"enable_bucket"} <= set(values), (name, fields - set(values))
    assert {"learning_rate", "seed", "train_batch_size", "random_flip", "resolution", "adam_beta1"} <= set(
        values
    )
    assert not {"max_train_steps", "output_dir", "checkpointing_steps", "validation_prompt"} & set(values)


@pytest.mark.slow
def test_a_runs_config_toml_re_runs_it_bit_for_bit(tmp_path, tiny_model, tiny_dataset):
    flags = ("--max_train_steps", "3", "--random_flip", "--caption_dropout_rate", "0.3", "--rank", "2")
    result = train(tiny_model, tiny_dataset, tmp_path / "a", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    from conftest import run_trainer

    again = run_trainer(
        ["--config", str(tmp_path / "a" / "config.toml"), "--output_dir", str(tmp_path / "b")]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "config.toml").read_text().replace("/a/", "/b/") == (
        tmp_path / "b" / "config.toml"
    ).read_text().replace("/a/", "/b/")
