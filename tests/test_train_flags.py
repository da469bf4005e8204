"""Each training flag has the effect it names, measured on what the run did: the optimizer's own parameter
groups, the size of the first update, the learning rate logged at every step, the captions and crops each
batch trained on, the pictures' pixels, and every header key the LoRA files promise."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from conftest import lora_header, lora_weights, read_trace, train, train_args
from PIL import Image
from test_train_script import ok, scalars_and_images

pytestmark = pytest.mark.slow

VALIDATE = ("--validation_prompt", "a red circle", "--validation_steps", "1", "--num_validation_images", "1")
VALIDATE += ("--validation_num_inference_steps", "2")
REF = ("--max_train_steps", "2", "--lr_scheduler", "constant", "--logging_steps", "1", *VALIDATE)


def traced(tmp_path, name, *args, **kwargs):
    """Train with SDLORA_TRACE_DIR; return (output folder, the process's trace events)."""
    trace = tmp_path / f"trace-{name}"
    trace.mkdir()
    ok(train(*args[:2], tmp_path / name, *args[2:], env={"SDLORA_TRACE_DIR": str(trace)}, **kwargs))
    return tmp_path / name, read_trace(trace)[0]


def setup_of(events) -> dict:
    return next(e for e in events if e["event"] == "setup")


def largest_up(folder, part: str = "unet") -> float:
    """The largest LoRA up (lora_B) weight of a part: zero at initialisation, so after one step the update."""
    return max(
        t.abs().max().item()
        for k, t in lora_weights(folder).items()
        if k.startswith(f"{part}.") and "lora_B" in k
    )


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_model, tiny_dataset):
    """A plain 2-step run with validation images at each step: what the flags below are compared with."""
    return traced(tmp_path_factory.mktemp("ref"), "ref", tiny_model, tiny_dataset, *REF)


def test_optimizer_flags_reach_the_optimizer_and_max_grad_norm_bounds_the_update(
    tmp_path, ref, tiny_model, tiny_dataset
):
    flags = (
        "--max_train_steps",
        "1",
        "--max_grad_norm",
        "1e-9",
        "--adam_beta1",
        "0.8",
        "--adam_beta2",
        "0.9",
    )
    flags += ("--adam_epsilon", "1e-7", "--adam_weight_decay", "0.5", "--channels_last")
    out, events = traced(tmp_path, "clipped", tiny_model, tiny_dataset, *flags)
    (group,) = setup_of(events)["param_groups"]
    assert group["betas"] == [0.8, 0.9] and group["eps"] == 1e-7 and group["weight_decay"] == 0.5
    assert group["lr"] == 1e-3 and setup_of(events)["channels_last"] is True
    assert setup_of(ref[1])["channels_last"] is False
    # Adam's first step moves each weight by about lr whatever the gradient's scale, unless the clipped
    # gradient falls below epsilon: a norm of 1e-9 over ~6k weights is ~1e-11 each, so the step is ~1e-4 lr.
    one_step = traced(tmp_path, "one", tiny_model, tiny_dataset, "--max_train_steps", "1")[0]
    assert largest_up(one_step) == pytest.approx(1e-3, rel=0.02)
    assert largest_up(out) < 1e-2 * largest_up(one_step)


def test_unet_and_text_encoder_learning_rates_drive_their_own_updates(tmp_path, tiny_model, tiny_dataset):
    flags = (
        "--max_train_steps",
        "1",
        "--train_text_encoder",
        "--unet_lr",
        "1e-3",
        "--text_encoder_lr",
        "1e-5",
    )
    out, events = traced(tmp_path, "lrs", tiny_model, tiny_dataset, *flags)
    assert [g["lr"] for g in setup_of(events)["param_groups"]] == [1e-3, 1e-5]
    assert largest_up(out, "unet") == pytest.approx(1e-3, rel=0.02)
    assert largest_up(out, "text_encoder") == pytest.approx(1e-5, rel=0.02)
    assert lora_header(out)["ss_unet_lr"] == "0.001" and lora_header(out)["ss_text_encoder_lr"] == "1e-05"


def test_warmup_and_cosine_give_the_learning_rate_of_the_formula_at_every_step(
    tmp_path, tiny_model, tiny_dataset
):
    out = tmp_path / "cosine"
    flags = (
        "--max_train_steps",
        "6",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--logging_steps",
        "1",
    )
    ok(train(tiny_model, tiny_dataset, out, *flags))
    logged = scalars_and_images(out / "logs")[0]["lr"]

    def expected(step: int) -> float:  # linear warm-up, then half a cosine to 0 (Loshchilov & Hutter 2017)
        if step < 2:
            return 1e-3 * step / 2
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (6 - 2)))

    assert logged == pytest.approx([expected(n) for n in range(1, 7)], rel=1e-6, abs=1e-12)


def test_a_vae_with_other_weights_changes_the_latents(tmp_path, ref, tiny_model, tiny_dataset):
    from sdlora.tiny_model import build_tiny_pipeline

    build_tiny_pipeline(seed=5).vae.save_pretrained(tmp_path / "vae")  # the same shape, other weights
    other = traced(
        tmp_path,
        "vae",
        tiny_model,
        tiny_dataset,
        *REF,
        "--pretrained_vae_model_name_or_path",
        str(tmp_path / "vae"),
    )
    loss = {
        name: scalars_and_images(folder / "logs")[0]["loss"][0]
        for name, folder in (("ref", ref[0]), ("vae", other[0]))
    }
    assert loss["ref"] != loss["vae"], loss


@pytest.fixture(scope="module")
def tagged_folder(tmp_path_factory):
    """Four transparent images with tag captions separated by ';', as an imagefolder."""
    folder = tmp_path_factory.mktemp("tagged")
    rows = []
    for i in range(4):
        image = Image.new("RGBA", (96, 80), (0, 0, 0, 0))
        image.paste((200, 40 * i, 90, 255), (20, 20, 70, 60))
        image.save(folder / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": "red; square; small; centered; simple"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def folder_run(tmp_path, name, tiny_model, folder, *flags):
    from conftest import run_trainer

    argv = train_args(tiny_model, folder, tmp_path / name, *flags)
    i = argv.index("--dataset_from_disk")
    argv[i : i + 3] = ["--train_data_dir", str(folder)]
    trace = tmp_path / f"trace-{name}"
    trace.mkdir()
    ok(run_trainer(argv, env={"SDLORA_TRACE_DIR": str(trace)}))
    return tmp_path / name, read_trace(trace)[0]


def test_caption_and_crop_flags_shape_what_each_batch_trains_on(tmp_path, tiny_model, tagged_folder):
    flags = ("--max_train_steps", "6", "--caption_separator", ";", "--shuffle_caption", "--keep_tokens", "1")
    flags += (
        "--caption_tag_dropout_rate",
        "0.3",
        "--caption_suffix",
        "zzz",
        "--random_crop",
        "--logging_dir",
        "tb",
    )
    out, events = folder_run(tmp_path, "tags", tiny_model, tagged_folder, *flags)
    batches = [e for e in events if e["event"] == "batch"]
    captions = [c for e in batches for c in e["captions"]]
    tags = [c.removesuffix(" zzz").split("; ") for c in captions]
    assert all(c.endswith(" zzz") for c in captions) and all(t[0] == "red" for t in tags)  # kept token first
    assert any(len(t) < 5 for t in tags)  # tags dropped
    assert len({tuple(t) for t in tags if len(t) == 5}) > 1  # shuffled at ';' (',' would keep one tag)
    crops = {}
    for e in batches:
        for index, crop in zip(e["index"], e["crops"]):
            crops.setdefault(index, set()).add(tuple(crop))
    assert any(len(c) > 1 for c in crops.values())  # random crops drawn anew each epoch
    assert list((out / "tb").rglob("events.out.tfevents.*")) and not (out / "logs").exists()


def test_background_and_interpolation_change_the_pictures(tmp_path, tiny_model, tagged_folder):
    first = {}
    for name, flags in {
        "plain": (),
        "black": ("--background", "black"),
        "nearest": ("--image_interpolation_mode", "nearest"),
    }.items():
        out, _ = folder_run(
            tmp_path, name, tiny_model, tagged_folder, "--max_train_steps", "1", "--resolution", "48", *flags
        )
        first[name] = scalars_and_images(out / "logs")[0]["loss"][0]
    assert len(set(first.values())) == 3, first


def test_held_out_flags_a_separate_folder_early_stopping_delta_and_guidance(
    tmp_path, ref, tiny_model, tiny_dataset, tagged_folder
):
    flags = (
        *REF,
        "--max_train_steps",
        "6",
        "--validation_data_dir",
        str(tagged_folder),
        "--validation_loss_steps",
        "1",
    )
    flags += (
        "--early_stopping_patience",
        "1",
        "--early_stopping_min_delta",
        "1e9",
        "--validation_guidance_scale",
        "1",
    )
    out, _ = traced(tmp_path, "held", tiny_model, tiny_dataset, *flags)
    assert [r.split(",")[0] for r in (out / "validation_loss.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert lora_header(out)["ss_steps"] == "2"  # no gain counts under a delta of 1e9: stopped at the 2nd
    # Same weights at step 1 (a held-out set never trains), another guidance scale: other pixels.
    (a,), (b,) = (list((folder / "validation" / "step-1").glob("*.png")) for folder in (out, ref[0]))
    assert np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int)).max() > 0


def test_every_header_key_the_lora_files_promise(ref):
    header = lora_header(ref[0])
    # The sample images' sizes put them in buckets 48x80 (96x128), 64x64 (six) and 80x48 (128x96) at 64 px.
    ar_error = (2 * abs(math.log((80 / 48) / (128 / 96))) + 2 * abs(math.log(112 / 96))) / 8
    expected = {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_v_parameterization": "False",
        "ss_resolution": "(64, 64)",
        "ss_num_train_images": "8",
        "ss_steps": "2",
        "ss_epoch": "1",
        "ss_max_train_steps": "2",
        "ss_learning_rate": "0.001",
        "ss_unet_lr": "0.001",
        "ss_text_encoder_lr": "0",
        "ss_lr_scheduler": "constant",
        "ss_lr_warmup_steps": "500",
        "ss_optimizer": "torch.optim.AdamW",
        "ss_max_grad_norm": "1.0",
        "ss_batch_size_per_device": "2",
        "ss_gradient_accumulation_steps": "1",
        "ss_mixed_precision": "no",
        "ss_seed": "7",
        "ss_enable_bucket": "True",
        "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": "32",
        "ss_max_bucket_reso": "128",
        "ss_flip_aug": "False",
        "ss_caption_dropout_rate": "0.0",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_shuffle_caption": "False",
        "ss_keep_tokens": "0",
        "ss_noise_offset": "0.0",
        "ss_min_snr_gamma": "None",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"lora_layers": "attn"}),
        "ss_output_name": "ref",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "ref",
        "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon",
        "sdlora_adapter": "LoRA",
    }
    assert {k: header.get(k) for k in expected} == expected
    assert header["ss_sd_model_name"].endswith("tiny-sd")
    assert float(header["ss_training_started_at"]) <= float(header["ss_training_finished_at"])
    # modelspec.date: ISO 8601 local time of the save, within the run (SAI's model spec)
    saved = time.mktime(time.strptime(header["modelspec.date"], "%Y-%m-%dT%H:%M:%S"))
    assert (
        float(header["ss_training_started_at"]) - 1 <= saved <= float(header["ss_training_finished_at"]) + 1
    )
    buckets = json.loads(header["ss_bucket_info"])
    assert buckets["buckets"] == {
        "0": {"resolution": [48, 80], "count": 1},
        "1": {"resolution": [64, 64], "count": 6},
        "2": {"resolution": [80, 48], "count": 1},
    }
    assert buckets["mean_img_ar_error"] == pytest.approx(ar_error)
    tags = json.loads(header["ss_tag_frequency"])["ref"]
    assert sum(tags.values()) == 8 and tags["a red circle on a dark blue background"] == 1
    assert "lora_adapter_metadata" in header and header["format"] == "pt"
    kohya = lora_header(ref[0], "pytorch_lora_weights_kohya.safetensors")
    assert {k: kohya.get(k) for k in expected} == expected


def test_trigger_words_go_to_the_header(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "trigger"
    ok(train(tiny_model, tiny_dataset, out, "--max_train_steps", "1", "--caption_prefix", "sks style, zwx,"))
    header = lora_header(out)
    assert json.loads(header["trained_words"]) == ["sks style", "zwx"]
    assert header["modelspec.trigger_phrase"] == "sks style, zwx"
    assert json.loads(header["ss_tag_frequency"])["trigger"]["zwx"] == 8
    weights = lora_weights(out)
    assert all(torch.isfinite(t).all() for t in weights.values())


def buckets_of(folder) -> dict[tuple[int, int], int]:
    info = json.loads(lora_header(folder)["ss_bucket_info"])["buckets"].values()
    return {tuple(b["resolution"]): b["count"] for b in info}


def test_bucket_flags_and_sizes_that_cannot_work(tmp_path, tiny_model, tiny_dataset):
    from test_train_script import refused

    negative = train(tiny_model, tiny_dataset, tmp_path / "x", "--resolution", "-64")
    assert (
        negative.returncode == 2
        and "error: --resolution -64: must be a positive multiple of 8" in negative.stderr
    )
    refused(
        train(tiny_model, tiny_dataset, tmp_path / "x", "--min_bucket_reso", "36"),
        "multiple of the bucket step 16",
    )
    one = ("--max_train_steps", "1")
    ok(train(tiny_model, tiny_dataset, tmp_path / "r72", *one, "--resolution", "72"))
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets_of(tmp_path / "r72"))  # (68x64 before)
    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "square",
            *one,
            "--bucket_reso_steps",
            "32",
            "--max_bucket_reso",
            "64",
        )
    )
    assert buckets_of(tmp_path / "square") == {(64, 64): 8}
    # 128 px: the 96 px images are small; without upscaling each trains at its own size rounded to 16.
    kept = ok(
        train(tiny_model, tiny_dataset, tmp_path / "own", *one, "--resolution", "128", "--bucket_no_upscale")
    )
    assert "will be upscaled" not in kept.stderr
    assert buckets_of(tmp_path / "own") == {
        (96, 96): 3,
        (128, 96): 1,
        (96, 128): 1,
        (112, 96): 1,
        (96, 112): 1,
        (128, 128): 1,
    }


def test_images_without_a_caption_line_are_refused_unless_skipped(tmp_path, tiny_model, tagged_folder):
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(tagged_folder, folder)
    Image.new("RGB", (64, 64), "blue").save(folder / "uncaptioned.png")
    from test_train_script import refused, train_from_folder

    refused(train_from_folder(tiny_model, folder, tmp_path / "a", "--max_train_steps", "1"), "--skip_invalid")
    skipped = ok(
        train_from_folder(tiny_model, folder, tmp_path / "b", "--max_train_steps", "1", "--skip_invalid")
    )
    assert "uncaptioned.png: no line in" in skipped.stderr and "examples = 4" in skipped.stderr


def test_cache_batch_size_and_image_column(tmp_path, ref, tiny_model, rich_dataset):
    import datasets

    renamed = tmp_path / "renamed"
    datasets.load_from_disk(str(rich_dataset)).rename_column("image", "picture").save_to_disk(str(renamed))
    out, events = traced(
        tmp_path, "batches", tiny_model, renamed, *REF, "--image_column", "picture", "--cache_batch_size", "3"
    )
    # The sample images' buckets hold 1, 6 and 1 images: encoded in batches of at most 3, one bucket each.
    assert sorted(e["size"] for e in events if e["event"] == "vae-batch") == [1, 1, 3, 3]
    assert sorted(e["size"] for e in ref[1] if e["event"] == "vae-batch") == [1, 1, 6]  # the default, 8
    assert lora_header(out)["ss_num_train_images"] == "8"
    # The same pictures under another column name, batched otherwise: the same training within rounding.
    a, b = lora_weights(out), lora_weights(ref[0])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
