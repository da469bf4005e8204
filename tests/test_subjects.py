"""Teaching a subject through the trainer: prior preservation with drawn class images and kohya's folders
(x buckets x two processes x resume), the masked loss (x flips x buckets x the disk cache), dataset configs
of subsets with repeats (x resume), and the bad inputs each brings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import LATEST, lora_header, run_script, run_trainer, same_weights, train_args, train_command
from PIL import Image, ImageDraw
from test_train_script import ok, refused, scalars_and_images

pytestmark = pytest.mark.slow


def without_dataset(args: list[str]) -> list[str]:
    """conftest's trainer arguments without its saved dataset: these tests name their own folders."""
    at = args.index("--dataset_disk_path")
    return [a for i, a in enumerate(args) if a != "--dataset_from_disk" and i not in (at, at + 1)]


def train(tiny_model, output_dir, *flags, env=None):
    return run_trainer(
        without_dataset(train_args(tiny_model, output_dir.parent / "unused", output_dir, *flags)), env
    )


SIZES = [(48, 48), (64, 32), (32, 64)]  # three aspect ratios: three buckets at resolution 32
SHORT = (
    "--resolution",
    "32",
    "--bucket_reso_steps",
    "16",
    "--min_bucket_reso",
    "16",
    "--lr_scheduler",
    "constant",
)


def shape_image(size, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(200, 30, 30))
    return image


def subject_folder(root, captions=("sks circle one", "sks circle two", None)):
    """kohya's layout: <root>/3_sks circle/ with three pictures of three shapes, .txt captions for some."""
    folder = root / "3_sks circle"
    folder.mkdir(parents=True)
    for i, (size, caption) in enumerate(zip(SIZES, captions)):
        shape_image(size, i).save(folder / f"p{i}.png")
        if caption:
            (folder / f"p{i}.txt").write_text(caption)
    return root


def test_prior_preservation_with_kohya_folders_buckets_two_processes_resumes_exactly(tmp_path, tiny_model):
    data, classes = subject_folder(tmp_path / "subject"), tmp_path / "class"
    flags = (
        *SHORT, "--train_data_dir", str(data), "--with_prior_preservation", "--class_data_dir", str(classes),
        "--class_prompt", "a circle", "--num_class_images", "3", "--prior_loss_weight", "0.5",
        "--train_batch_size", "1", "--max_train_steps", "4", "--checkpointing_steps", "2",
    )  # fmt: skip
    straight = tmp_path / "straight"
    cmd = without_dataset(train_command(tiny_model, tmp_path / "unused", straight, *flags, processes=2))
    ok(run_script(cmd))
    drawn = sorted(classes.glob("class_*.png"))
    assert len(drawn) == 3, drawn
    stamps = [p.stat().st_mtime_ns for p in drawn]

    # Resume a second output folder from the straight run's checkpoint-2: it ends bit-identical, and the class
    # images already there are kept, not drawn again.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    again = [a if a != str(straight) else str(resumed) for a in cmd]
    ok(run_script([*again, *LATEST]))
    assert same_weights(straight, resumed)
    assert [p.stat().st_mtime_ns for p in drawn] == stamps

    scalars, _ = scalars_and_images(straight / "logs")
    assert scalars["loss/instance"] and scalars["loss/prior"]
    header = lora_header(straight)
    assert header["ss_num_reg_images"] == "3"
    dirs, reg_dirs = json.loads(header["ss_dataset_dirs"]), json.loads(header["ss_reg_dataset_dirs"])
    assert dirs == {"3_sks circle": {"n_repeats": 3, "img_count": 3}}, dirs
    assert reg_dirs == {"class": {"n_repeats": 1, "img_count": 3}}, reg_dirs
    tags = json.loads(header["ss_tag_frequency"])
    assert tags["3_sks circle"] == {"sks circle one": 1, "sks circle two": 1, "sks circle": 1}, tags


def masked_data(root, noise_in_black: bool = False):
    """Three pictures with .txt captions and masks: left half, all white, all black (the last one's pixels
    replaced by noise when asked: the masked loss must not see them)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, size in enumerate(SIZES):
        picture = shape_image(size, i)
        if i == 2 and noise_in_black:
            picture = Image.fromarray(
                np.random.default_rng(5).integers(0, 255, (size[1], size[0], 3), np.uint8)
            )
        picture.save(images / f"p{i}.png")
        (images / f"p{i}.txt").write_text(f"sks circle {i}")
        mask = Image.new("L", size, [0, 255, 0][i])
        if i == 0:
            ImageDraw.Draw(mask).rectangle((0, 0, size[0] // 2 - 1, size[1]), fill=255)
        mask.save(masks / f"p{i}.png")
    return images, masks


def test_masked_loss_ignores_what_the_mask_hides_with_flips_buckets_and_the_disk_cache(tmp_path, tiny_model):
    cache = tmp_path / "cache"
    common = (*SHORT, "--random_flip", "--max_train_steps", "3", "--train_batch_size", "1")

    def run(name, images, *extra):
        out = tmp_path / name
        ok(train(tiny_model, out, *common, "--train_data_dir", str(images), *extra))
        return out

    images_a, masks_a = masked_data(tmp_path / "a")
    images_b, masks_b = masked_data(tmp_path / "b", noise_in_black=True)
    masked = ("--masked_loss", "--cache_latents_to_disk", "--latents_cache_dir", str(cache))
    a = run("masked-a", images_a, *masked, "--mask_dir", str(masks_a))
    b = run("masked-b", images_b, *masked, "--mask_dir", str(masks_b))
    assert same_weights(a, b)  # the noise sits under a black mask: nothing of it is learned
    # Without the masks the same change is learned (so the comparison above can fail).
    assert not same_weights(run("plain-a", images_a), run("plain-b", images_b))
    assert len(list(cache.glob("latents-*"))) == 2

    # An edited mask is a new cache (never the stale masks) and another LoRA.
    Image.new("L", SIZES[0], 255).save(masks_a / "p0.png")
    edited = run("masked-a-edited", images_a, *masked, "--mask_dir", str(masks_a))
    assert len(list(cache.glob("latents-*"))) == 3
    assert not same_weights(a, edited)


def test_a_mask_follows_its_picture_through_bucket_crop_flip_and_cache(tmp_path):
    import torch

    from sdlora.buckets import BucketSettings
    from sdlora.cache import LatentCache, TensorStore
    from sdlora.cache.latents import encode_latents
    from sdlora.caption_controls import CaptionControls
    from sdlora.data import Augment, DatasetSource, TrainImages, load_train_dataset
    from sdlora.data.masks import MaskSource, latent_mask
    from sdlora.data.pictures import ExampleGroup
    from sdlora.tiny_model import build_tiny_pipeline

    images_dir, masks_dir = masked_data(tmp_path)
    dataset = load_train_dataset(DatasetSource(image_folder=str(images_dir)))
    group = ExampleGroup("data", len(dataset), CaptionControls(), masks=MaskSource(str(masks_dir)))
    images = TrainImages(dataset, "image", dataset["text"], Augment(0, True), CaptionControls(), [group])
    images.sizes = list(SIZES)
    images.place(BucketSettings("bucket", 32, step=16, min_reso=16, max_reso=64))
    placement = images.placements[0]  # 48x48 -> 32x32; the mask's white half is the picture's left half
    for flip in (False, True):
        mask = images.mask(0, flip, placement.crop)[0]  # (H, W)
        assert mask.shape == (placement.bucket[1], placement.bucket[0])
        left, right = mask[:, : mask.shape[1] // 2].mean(), mask[:, mask.shape[1] // 2 :].mean()
        assert (left > 0.9 and right < 0.1) if not flip else (right > 0.9 and left < 0.1), (flip, left, right)
    vae = build_tiny_pipeline().vae
    entries = encode_latents(images, vae, [0, 1, 2], [False, True], torch.device("cpu"), torch.float32, 2)
    store = TensorStore(3, list(entries[0]), None, True)
    store.fill(lambda idx: entries, 0, 1, lambda: None)
    cache = LatentCache(store, 1.0, None)
    for flip in (False, True):
        cached = cache.masks(torch.tensor([0]), torch.tensor([flip]), "cpu")[0]
        expected = latent_mask(images.mask(0, flip, placement.crop)[None], tuple(cached.shape[-2:]))[0]
        assert torch.equal(cached, expected)


SUBSETS = """
[general]
shuffle_caption = false

[[datasets]]
resolution = 32
bucket_reso_steps = 16
min_bucket_reso = 16

  [[datasets.subsets]]
  image_dir = "{a}"
  num_repeats = {repeats}
  caption_prefix = "sks, "
  name = "subject"

  [[datasets.subsets]]
  image_dir = "{b}"
  max_bucket_reso = 32
  name = "style"
"""


def test_dataset_config_subsets_with_repeats_resume_exactly_and_say_so(tmp_path, tiny_model):
    a, b = masked_data(tmp_path / "a")[0], masked_data(tmp_path / "b")[0]
    config = tmp_path / "subsets.toml"
    config.write_text(SUBSETS.format(a=a, b=b, repeats=2))
    flags = ("--dataset_config", str(config), "--max_train_steps", "4", "--checkpointing_steps", "2")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    ok(train(tiny_model, straight, *flags))
    stopped = train(tiny_model, interrupted, *flags, env={"SDLORA_STOP_AT": "step:2"})
    assert stopped.returncode != 0 and (interrupted / "checkpoint-2").is_dir()
    ok(train(tiny_model, interrupted, *flags, *LATEST))
    assert same_weights(straight, interrupted)
    header = lora_header(straight)
    assert json.loads(header["ss_dataset_dirs"]) == {
        "subject": {"n_repeats": 2, "img_count": 3},
        "style": {"n_repeats": 1, "img_count": 3},
    }
    assert header["ss_num_train_images"] == "9"  # kohya's count: each image times its repeats
    buckets = json.loads(header["ss_bucket_info"])["buckets"]
    # The datasets' resolution 32 (not the model's 64) for both; style's max_bucket_reso 32 gives it 32x16
    # where the subject, up to 64 px a side, takes kohya's nearest, 48x16.
    assert sorted(tuple(b["resolution"]) for b in buckets.values()) == [
        (16, 32),
        (16, 48),
        (32, 16),
        (32, 32),
        (48, 16),
    ]
    # Another num_repeats in the file is another run: refused on resume, named.
    config.write_text(SUBSETS.format(a=a, b=b, repeats=3))
    refused(train(tiny_model, interrupted, *flags, *LATEST), "subsets")


def test_bad_subject_inputs_are_one_line_naming_the_file_and_lose_nothing(tmp_path, tiny_model):
    images, masks = masked_data(tmp_path / "d")

    def fails(*flags, words):
        out = tmp_path / "out"
        result = train(tiny_model, out, *SHORT, "--max_train_steps", "1", *flags)
        assert result.returncode != 0, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        for word in words:
            assert word in result.stderr, (word, result.stderr[-2000:])
        assert not (out / "pytorch_lora_weights.safetensors").exists()

    data = ("--train_data_dir", str(images), "--masked_loss", "--mask_dir", str(masks))
    Image.new("L", (8, 8)).save(masks / "stray.png")  # a mask without an image
    fails(*data, words=["stray.png", "without an image"])
    (masks / "stray.png").unlink()
    Image.new("L", (10, 10), 255).save(masks / "p1.png")  # a mask of another size
    fails(*data, words=["p1.png", "10x10", "64x32"])
    empty = tmp_path / "class"
    empty.mkdir()
    fails("--train_data_dir", str(images), "--with_prior_preservation", "--class_data_dir", str(empty),
          words=[str(empty), "--class_prompt"])  # fmt: skip
    assert list(empty.iterdir()) == []
    config = tmp_path / "subsets.toml"
    config.write_text(f'[[subsets]]\nimage_dir = "{tmp_path / "missing"}"\n')
    fails("--dataset_config", str(config), words=[str(config), "missing", "does not exist"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a circle --x 3\n")
    fails(
        "--train_data_dir", str(images), "--validation_prompts_dir", str(prompts), words=[str(prompts), "--x"]
    )
    assert (masks / "p0.png").is_file() and len(list(masks.iterdir())) == 3
