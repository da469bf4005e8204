"""train_text_to_image_lora.py end to end on the tiny model: outputs, resume, caches, flags and their effects.

The trainer runs inside the test process (conftest.train: the script's own parse_args and main, without the
5 s of imports a new process costs); tests of launchers, several processes and signals start processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LATEST, lora_header, lora_weights, same_weights, train
from diffusers import StableDiffusionPipeline
from PIL import Image

from sdlora.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def refused(result, *words):
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def scalars_and_images(log_dir: Path) -> tuple[dict[str, list[float]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, []
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.value for e in acc.Scalars(tag)]
        images += acc.Tags()["images"]
    return scalars, images


def image(pipe, **kwargs):
    kwargs = {
        "num_inference_steps": 3,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np",
        **kwargs,
    }
    return pipe("a red circle", **kwargs).images


def pipeline(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_end_to_end_outputs(tmp_path, tiny_model, tiny_dataset, repo):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"  # the repo's prompts, the second with kohya's per-prompt options
    first, second = (repo / "validation_prompts.txt").read_text().splitlines()[:2]
    prompts.write_text(f"{first}\n# a comment\n{second} --w 48 --h 32 --d 3 --l 5 --s 2 --n blurry\n")
    result = ok(
        train(
            tiny_model,
            tiny_dataset,
            out,
            *("--max_train_steps", "12", "--checkpointing_steps", "4", "--checkpoints_total_limit", "2"),
            *(
                "--validation_prompts_dir",
                str(prompts),
                "--num_validation_images",
                "2",
            ),
            *(
                "--validation_epochs",
                "2",
                "--validation_num_inference_steps",
                "3",
                "--lora_alpha",
                "8",
                "--random_flip",
            ),
            *("--caption_prefix", "sks style,"),
        )
    )
    assert "total optimization steps = 12" in result.stderr and "(bucket)" in result.stderr

    # The LoRA loads into a plain pipeline and changes what it draws.
    pipe = pipeline(tiny_model)
    before = image(pipe)
    pipe.load_lora_weights(str(out))
    after = image(pipe)
    assert abs(after - before).max() > 1e-3

    # The kohya/A1111 copy (alpha 8 in the file) gives the same image as the diffusers file.
    kohya = pipeline(tiny_model)
    kohya.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    assert abs(image(kohya) - after).max() < 1e-5
    alphas = {
        k: v.item()
        for k, v in lora_weights(out, "pytorch_lora_weights_kohya.safetensors").items()
        if k.endswith(".alpha")
    }
    assert alphas and set(alphas.values()) == {8.0}

    # Rotation kept the newest two checkpoints, each with both files in the same loadable formats.
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-8", "checkpoint-12"]
    assert lora_weights(out / "checkpoint-12").keys() == lora_weights(out).keys()
    assert same_weights(out / "checkpoint-12", out)
    assert (out / "checkpoint-12" / "pytorch_lora_weights_kohya.safetensors").is_file()

    # Buckets 48x80 (1 image), 64x64 (6) and 80x48 (1) at batch 2: 5 batches, so 5 steps per epoch. Validation
    # after epoch 2 (step 10) and at the end with the saved file (step 12).
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-10", "step-12"]
    for step in (10, 12):
        pngs = sorted((out / "validation" / f"step-{step}").glob("*.png"))
        assert len(pngs) == 4, pngs
        sizes = {p.name.split("_")[0]: Image.open(p).size for p in pngs}
        assert sizes == {
            "00-a-red-sks-heart-on-a-green-background": (64, 64),
            "01-a-blue-circle-on-a-yellow-background": (48, 32),
        }

    scalars, images = scalars_and_images(out / "logs")
    assert len(scalars["loss"]) == 12 and len(scalars["lr"]) == 12
    assert any("sks-heart" in tag for tag in images) and any("blue-circle" in tag for tag in images)
    args = json.loads((out / "args.json").read_text())
    assert (
        args["rank"] == 4
        and args["lora_alpha"] == 8.0
        and args["resolution"] == 64
        and args["crop_mode"] == "bucket"
    )
    card = (out / "README.md").read_text()
    assert (
        "load_lora_weights" in card
        and "sks style" in card
        and "pytorch_lora_weights_kohya.safetensors" in card
    )
    assert "time: total" in result.stderr

    # Both files carry kohya's and the model spec's metadata, as strings.
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        meta = lora_header(out, name)
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "8.0" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_steps"] == "12" and meta["ss_epoch"] == "3" and meta["ss_num_train_images"] == "8"
        assert (
            meta["ss_resolution"] == "(64, 64)"
            and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        )
        assert meta["modelspec.prediction_type"] == "epsilon" and json.loads(meta["trained_words"]) == [
            "sks style"
        ]
        buckets = json.loads(meta["ss_bucket_info"])["buckets"]
        assert sum(b["count"] for b in buckets.values()) == 8
        tags = json.loads(meta["ss_tag_frequency"])["out"]
        assert tags["sks style"] == 8 and tags["a red circle on a dark blue background"] == 1
    assert lora_header(out / "checkpoint-8")["ss_steps"] == "8"


RESUME = (
    "--checkpointing_steps",
    "3",
    "--random_flip",
    "--gradient_accumulation_steps",
    "2",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "2",
    "--caption_dropout_rate",
    "0.3",
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model, tiny_dataset) -> Path:
    """An uninterrupted 8-step run with buckets, flips, accumulation, a cosine schedule and caption dropout."""
    out = tmp_path_factory.mktemp("straight") / "out"
    ok(train(tiny_model, tiny_dataset, out, *RESUME, "--max_train_steps", "8"))
    return out


def stopped_at(step: int) -> dict:
    """What Ctrl-C after `step` does (a checkpoint at that step, then exit 2), inside the test process."""
    return {"SDLORA_STOP_AT": f"step:{step}"}


def run8(tiny_model, tiny_dataset, out, *extra, env=None):
    """The RESUME run to 8 steps, as `straight` runs it, plus `extra`."""
    return train(tiny_model, tiny_dataset, out, *RESUME, "--max_train_steps", "8", *extra, env=env)


def test_resume_mid_epoch_with_buckets_matches_the_uninterrupted_run(
    tmp_path, tiny_model, tiny_dataset, straight
):
    out = tmp_path / "out"
    stop = run8(tiny_model, tiny_dataset, out, env=stopped_at(5))
    assert stop.returncode == 2 and "resume with --resume_from_checkpoint latest" in stop.stderr
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-5"]
    shutil.rmtree(out / "checkpoint-5")  # as if killed after step 5: checkpoint-3 (mid-epoch) is the latest
    resumed = ok(run8(tiny_model, tiny_dataset, out, *LATEST))
    assert "resumed from" in resumed.stderr and "starting at 3" in resumed.stderr
    assert same_weights(out, straight)


def test_resuming_from_a_ctrl_c_checkpoint_matches_the_uninterrupted_run(
    tmp_path, tiny_model, tiny_dataset, straight
):
    out = tmp_path / "out"
    assert run8(tiny_model, tiny_dataset, out, env=stopped_at(4)).returncode == 2
    resumed = ok(run8(tiny_model, tiny_dataset, out, *LATEST))
    assert "starting at 4" in resumed.stderr and same_weights(out, straight)


def test_a_checkpoint_folder_path_resumes_and_a_wrong_path_is_refused(
    tmp_path, tiny_model, tiny_dataset, straight
):
    out = tmp_path / "out"
    run8(tiny_model, tiny_dataset, out, env=stopped_at(7))
    resumed = ok(run8(tiny_model, tiny_dataset, out, "--resume_from_checkpoint", str(out / "checkpoint-6")))
    assert f"resumed from {out / 'checkpoint-6'}" in resumed.stderr and same_weights(out, straight)
    wrong = run8(tiny_model, tiny_dataset, out, "--resume_from_checkpoint", str(tmp_path / "nowhere"))
    refused(wrong, "not a complete checkpoint folder")


def test_raising_max_train_steps_and_resuming_extends_a_finished_run(tmp_path, tiny_model, tiny_dataset):
    common = ("--checkpointing_steps", "4", "--random_flip", "--lr_scheduler", "constant")
    ok(train(tiny_model, tiny_dataset, tmp_path / "a", *common, "--max_train_steps", "8"))
    ok(train(tiny_model, tiny_dataset, tmp_path / "b", *common, "--max_train_steps", "4"))
    extend = ("--max_train_steps", "8", *LATEST)
    longer = ok(train(tiny_model, tiny_dataset, tmp_path / "b", *common, *extend))
    assert "starting at 4" in longer.stderr and same_weights(tmp_path / "a", tmp_path / "b")


def test_cached_path_trains_like_plain_path(tmp_path, tiny_model, tiny_dataset):
    common = ("--max_train_steps", "6", "--random_flip", "--train_batch_size", "3")
    ok(train(tiny_model, tiny_dataset, tmp_path / "cached", *common))
    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "plain",
            *common,
            "--no-cache_latents",
            "--no-cache_text_embeddings",
            *("--dataloader_num_workers", "2"),  # pictures made in worker processes, buckets and all
        )
    )
    a, b = lora_weights(tmp_path / "cached"), lora_weights(tmp_path / "plain")
    # Same noise, timesteps, batches and latent samples: only float rounding of batched vs single encodes differs.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_disk_cache_is_reused_equals_the_memory_cache_and_never_serves_other_settings(
    tmp_path, tiny_model, tiny_dataset
):
    cache = tmp_path / "cache"
    common = (
        "--max_train_steps",
        "4",
        "--random_flip",
        "--cache_latents_to_disk",
        "--latents_cache_dir",
        str(cache),
        # the bucket bounds given, so that --resolution below changes only the resolution
        *("--bucket_reso_steps", "16", "--min_bucket_reso", "32", "--max_bucket_reso", "128"),
    )
    first = ok(train(tiny_model, tiny_dataset, tmp_path / "a", *common))
    assert "cache written to" in first.stderr and "reusing the cache" not in first.stderr
    again = ok(train(tiny_model, tiny_dataset, tmp_path / "b", *common))
    assert again.stderr.count("reusing the cache") == 2  # latents and text embeddings
    ok(train(tiny_model, tiny_dataset, tmp_path / "memory", "--max_train_steps", "4", "--random_flip"))
    assert same_weights(tmp_path / "a", tmp_path / "memory") and same_weights(
        tmp_path / "b", tmp_path / "memory"
    )
    bigger = ok(train(tiny_model, tiny_dataset, tmp_path / "c", *common, "--resolution", "96"))
    assert bigger.stderr.count("reusing the cache") == 1  # the text cache still fits; the latents do not
    other_captions = ok(train(tiny_model, tiny_dataset, tmp_path / "d", *common, "--caption_prefix", "sks"))
    assert (
        other_captions.stderr.count("reusing the cache") == 1
    )  # the latents still fit; the captions changed
    assert len(list(cache.glob("latents-*"))) == 2 and len(list(cache.glob("text-*"))) == 2


def test_disk_cache_with_resume(tmp_path, tiny_model, tiny_dataset, straight):
    out, cache = tmp_path / "out", ("--cache_latents_to_disk",)
    train(tiny_model, tiny_dataset, out, *RESUME, *cache, "--max_train_steps", "8", env=stopped_at(4))
    resumed = ok(
        train(
            tiny_model,
            tiny_dataset,
            out,
            *RESUME,
            *cache,
            "--max_train_steps",
            "8",
            *LATEST,
        )
    )
    assert resumed.stderr.count("reusing the cache") == 2 and same_weights(out, straight)
    assert list((out / "cache").glob("latents-*/shard-00000.safetensors"))


def test_a_large_latent_cache_lives_on_disk_and_trains_the_same(tmp_path, tiny_model, tiny_dataset):
    common = ("--max_train_steps", "4", "--random_flip")
    small = ok(
        train(tiny_model, tiny_dataset, tmp_path / "disk", *common, "--cache_memory_limit_gb", "0.00001")
    )
    assert "kept on disk" in small.stderr and list(
        (tmp_path / "disk" / "cache").glob("latents-*/shard-*.safetensors")
    )
    ok(train(tiny_model, tiny_dataset, tmp_path / "memory", *common))
    assert not (tmp_path / "memory" / "cache").exists()
    assert same_weights(tmp_path / "disk", tmp_path / "memory")


def test_validation_steps_single_prompt_negatives_and_size(tmp_path, tiny_model, tiny_dataset):
    negatives = tmp_path / "negatives.txt"
    negatives.write_text("blurry, low quality\n")
    common = ("--max_train_steps", "8", "--validation_steps", "4", "--validation_prompt", "a red circle")
    common += ("--num_validation_images", "1", "--validation_num_inference_steps", "3")
    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "a",
            *common,
            "--validation_negative_prompts_dir",
            str(negatives),
        )
    )
    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "b",
            *common,
            "--validation_width",
            "96",
            "--validation_height",
            "48",
        )
    )
    from PIL import Image

    for run, size in (("a", (64, 64)), ("b", (96, 48))):
        for step in (4, 8):
            (png,) = (tmp_path / run / "validation" / f"step-{step}").glob("*.png")
            assert Image.open(png).size == size
    # The negative prompt reached the pipeline: same weights at step 4, other pixels.
    import numpy as np

    a, c = (tmp_path / "a" / "validation" / "step-4"), tmp_path / "c"
    ok(train(tiny_model, tiny_dataset, c, *common))
    (pa,), (pc,) = a.glob("*.png"), (c / "validation" / "step-4").glob("*.png")
    assert np.abs(np.asarray(Image.open(pa), dtype=int) - np.asarray(Image.open(pc), dtype=int)).max() > 0


def test_a_failing_validation_is_reported_and_training_goes_on(tmp_path, tiny_model, tiny_dataset, repo):
    result = ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "out",
            *("--max_train_steps", "8", "--validation_steps", "4", "--validation_num_inference_steps", "0"),
            *("--validation_prompts_dir", str(repo / "validation_prompts.txt")),
        )
    )
    assert "validation at step 4 failed" in result.stderr and "training continues" in result.stderr
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_a_failing_final_validation_never_costs_the_outputs(tmp_path, tiny_model, tiny_dataset):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "NoSuchScheduler"]  # training loads; every pipeline load fails
    (broken / "model_index.json").write_text(json.dumps(index))
    result = ok(
        train(
            broken,
            tiny_dataset,
            tmp_path / "out",
            *("--max_train_steps", "4", "--validation_steps", "2", "--validation_prompt", "a red circle"),
            *("--validation_num_inference_steps", "2", "--num_validation_images", "1"),
        )
    )
    assert "validation at step 2 failed" in result.stderr and "final validation failed" in result.stderr
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "args.json",
        "README.md",
    ):
        assert (tmp_path / "out" / name).is_file(), name


def test_train_data_dir_trains_on_every_image_whatever_its_name(tmp_path, tiny_model):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["COCO_val2014_000001.jpg", "COCO_val2014_000002.jpg", "train_0.jpg", "test_1.png", "img.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (64 + 16 * i, 64), (40 * i, 80, 120)).save(folder / name)
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": f"photo {n}"}) + "\n" for n in names)
    )
    result = ok(train_from_folder(tiny_model, folder, tmp_path / "out", "--max_train_steps", "2"))
    assert "examples = 5" in result.stderr


def train_from_folder(tiny_model, folder, out, *extra):
    from conftest import run_trainer, train_args

    argv = train_args(tiny_model, folder, out, *extra)
    i = argv.index("--dataset_from_disk")
    argv[i : i + 3] = ["--train_data_dir", str(folder)]
    return run_trainer(argv)


def test_flags_reach_the_run(tmp_path, tiny_model, tiny_dataset):
    from conftest import read_trace

    trace = tmp_path / "trace"
    trace.mkdir()
    result = ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "a",
            *(
                "--max_train_samples",
                "6",
                "--num_train_epochs",
                "3",
                "--scale_lr",
                "--gradient_accumulation_steps",
                "2",
            ),
            *("--gradient_checkpointing", "--lr_scheduler", "constant"),
            env={"SDLORA_TRACE_DIR": str(trace)},
        )
    )
    # 6 examples, batch 2, accumulation 2: 2 steps per epoch (3 batches: a step of 2 and a step of 1), 3 epochs.
    assert "examples = 6" in result.stderr and "total optimization steps = 6" in result.stderr
    scalars, _ = scalars_and_images(tmp_path / "a" / "logs")
    assert scalars["lr"][0] == pytest.approx(1e-3 * 2 * 2 * 1)  # --scale_lr: batch x accumulation x processes
    (events,) = read_trace(trace).values()
    setup = next(e for e in events if e["event"] == "setup")
    assert setup["gradient_checkpointing"] is True
    seen = {i for e in events if e["event"] == "batch" for i in e["index"]}
    assert seen == set(range(6))  # --max_train_samples: the first 6 examples only
    assert json.loads(lora_header(tmp_path / "a")["ss_num_train_images"]) == 6


def test_snr_gamma_noise_offset_and_prediction_type_change_the_training(tmp_path, tiny_model, tiny_dataset):
    common = ("--max_train_steps", "2", "--center_crop", "--train_batch_size", "8")
    runs = {
        "plain": (),
        "snr": ("--snr_gamma", "1"),
        "offset": ("--noise_offset", "0.1"),
        "v": ("--prediction_type", "v_prediction"),
    }
    first_loss = {}
    for name, extra in runs.items():
        ok(train(tiny_model, tiny_dataset, tmp_path / name, *common, *extra))
        first_loss[name] = scalars_and_images(tmp_path / name / "logs")[0]["loss"][0]
    assert len(set(first_loss.values())) == 4, first_loss
    assert first_loss["snr"] < first_loss["plain"]  # min(SNR, 1) / SNR <= 1 for every timestep
    assert lora_header(tmp_path / "v")["modelspec.prediction_type"] == "v"
    assert json.loads((tmp_path / "v" / "args.json").read_text())["prediction_type"] == "v_prediction"


def test_a_v_prediction_lora_is_sampled_as_v_prediction(tmp_path, tiny_model, tiny_dataset):
    import numpy as np

    from sdlora.generation import generate, inference_scheduler, load_pipeline

    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "v",
            "--max_train_steps",
            "2",
            "--prediction_type",
            "v_prediction",
        )
    )
    pipe, _ = load_pipeline(str(tiny_model), tmp_path / "v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    as_v = np.asarray(generate(pipe, "a red circle", num_inference_steps=3)[0], dtype=int)
    pipe.scheduler = inference_scheduler(str(tiny_model))  # the base model's own: epsilon
    as_eps = np.asarray(generate(pipe, "a red circle", num_inference_steps=3)[0], dtype=int)
    assert np.abs(as_v - as_eps).mean() > 1


def test_no_file_written_is_a_pickle(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    ok(
        train(
            tiny_model,
            tiny_dataset,
            out,
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
            "--use_8bit_adam",
        )
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files if not p.name.startswith("events.out.tfevents")}
    assert suffixes <= {".safetensors", ".json", ".md", ".toml", ".yml"}, (
        suffixes
    )  # (.yml: TensorBoard hparams)
    for path in files:
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", path  # pickle protocol / torch.save zip
    assert {p.name for p in (out / "checkpoint-4").iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "optimizer.safetensors",
        "training_state.json",
    }


def test_list_valued_captions_and_caption_controls_train(tmp_path, tiny_model, rich_dataset):
    shuffled = ok(
        train(
            tiny_model,
            rich_dataset,
            tmp_path / "tags",
            *(
                "--caption_column",
                "tags",
                "--max_train_steps",
                "4",
                "--shuffle_caption",
                "--keep_tokens",
                "1",
            ),
        )
    )
    assert shuffled.stderr.count("text embeddings not cached") == 1
    tags = json.loads(lora_header(tmp_path / "tags")["ss_tag_frequency"])["tags"]
    assert tags["simple shape"] == 8 and not any("[" in t for t in tags)
    dropped = ok(
        train(
            tiny_model,
            rich_dataset,
            tmp_path / "drop",
            "--max_train_steps",
            "4",
            "--caption_dropout_rate",
            "0.5",
        )
    )
    assert "text embeddings not cached" not in dropped.stderr  # the empty caption is one more cached entry


def test_an_earlier_runs_checkpoints_are_never_mixed_with_a_new_run(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    ok(train(tiny_model, tiny_dataset, out, "--max_train_steps", "6", "--checkpointing_steps", "6"))
    (out / "checkpoint-6").rename(out / "checkpoint-5000")  # a long earlier run's
    refused(
        train(tiny_model, tiny_dataset, out, "--max_train_steps", "4", "--checkpointing_steps", "2"),
        "checkpoint-5000",
    )
    assert (out / "checkpoint-5000").is_dir()
    ok(
        train(
            tiny_model,
            tiny_dataset,
            out,
            *("--max_train_steps", "4", "--checkpointing_steps", "2"),
            *("--checkpoints_total_limit", "1", "--overwrite_output_dir"),
        )
    )
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-4"]
    limit = train(tiny_model, tiny_dataset, out, "--checkpoints_total_limit", "0")
    assert limit.returncode == 2 and "error: --checkpoints_total_limit must be at least 1" in limit.stderr


def test_a_compiled_unet_saves_plain_lora_keys(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "out"
    common = ("--max_train_steps", "2", "--checkpointing_steps", "2", "--center_crop")
    ok(
        train(
            tiny_model, tiny_dataset, out, *common, "--torch_compile", "--torch_compile_backend", "aot_eager"
        )
    )
    for folder in (out, out / "checkpoint-2"):
        for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
            assert not [k for k in lora_weights(folder, name) if "orig_mod" in k]
    pipe = pipeline(tiny_model)
    before = image(pipe)
    pipe.load_lora_weights(str(out))
    assert abs(image(pipe) - before).max() > 1e-4
    ok(train(tiny_model, tiny_dataset, tmp_path / "eager", *common))
    a, b = lora_weights(out), lora_weights(tmp_path / "eager")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_deepspeed_and_fsdp_are_refused_before_loading(tmp_path, tiny_model, tiny_dataset):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        refused(train(tiny_model, tiny_dataset, tmp_path / "out", env={var: "true"}), "not supported", "DDP")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_offline_fails_before_any_work(tmp_path, tiny_model, tiny_dataset):
    refused(
        train(tiny_model, tiny_dataset, tmp_path / "out", "--push_to_hub", "--hub_model_id", "me/lora"),
        "HF_HUB_OFFLINE",
    )
    assert not (tmp_path / "out").exists()


def test_validation_images_are_those_the_saved_lora_gives_even_with_lora_dropout(
    tmp_path, tiny_model, tiny_dataset
):
    import numpy as np
    from PIL import Image

    from sdlora.generation import generate, load_pipeline

    out = tmp_path / "out"
    flags = (
        "--lora_dropout",
        "0.5",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "2",
    )
    flags += (
        "--validation_prompt",
        "a red circle",
        "--num_validation_images",
        "1",
        "--validation_num_inference_steps",
        "3",
    )
    ok(train(tiny_model, tiny_dataset, out, *flags))
    pipe, _ = load_pipeline(str(tiny_model), out / "checkpoint-2")
    (png,) = (out / "validation" / "step-2").glob("*.png")
    again = generate(pipe, "a red circle", None, 1, 3, 7.5, seed=7)[0]  # (the run's --seed 7)
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(Image.open(png), dtype=int)).max() <= 1
