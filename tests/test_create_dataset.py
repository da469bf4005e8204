"""create_dataset.py: round trips every image and caption; bad input fails clearly and writes nothing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from test_fileio import run_on_small_disk

import create_dataset
from sdlora.caption_controls import options
from sdlora.captions import write_metadata_jsonl
from sdlora.errors import run_cli

REPO = Path(__file__).resolve().parent.parent


def run_create(
    cwd: Path, *args: str, tiny_model: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "create_dataset.py"),
            "--pretrained_model_name_or_path",
            str(tiny_model),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_round_trip(dataset_dir: Path, images_dir: Path, captions: dict[str, str]) -> None:
    ds = datasets.load_from_disk(str(dataset_dir))
    assert ds.column_names == ["image", "text"]
    assert sorted(ds["text"]) == sorted(captions.values())
    by_caption = {row["text"]: row["image"] for row in ds}
    for name, caption in captions.items():
        original = np.asarray(Image.open(images_dir / name).convert("RGB"))
        assert np.array_equal(np.asarray(by_caption[caption]), original), name


def test_sample_data_round_trips(sample_data, tiny_model):
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert "8 images" in result.stdout
    captions = {
        Path(k).name: v for k, v in json.loads((sample_data / "image_captions.json").read_text()).items()
    }
    assert_round_trip(sample_data / "datasets" / "Text2Image_example", sample_data / "images", captions)


def test_absolute_paths_from_the_original_toolkit(sample_data, tiny_model):
    relative = json.loads((sample_data / "image_captions.json").read_text())
    absolute = {str((sample_data / k).resolve()): v for k, v in relative.items()}
    (sample_data / "abs.json").write_text(json.dumps(absolute))
    result = run_create(sample_data, "--captions_file", "abs.json", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert len(datasets.load_from_disk(str(sample_data / "datasets" / "Text2Image_example"))) == 8


def sample_captions(root: Path) -> dict[str, str]:
    """The sample data's captions by image file name."""
    return {Path(k).name: v for k, v in json.loads((root / "image_captions.json").read_text()).items()}


def test_metadata_jsonl_as_captions_file(sample_data, tiny_model):
    captions = sample_captions(sample_data)
    images = sample_data / "images"
    write_metadata_jsonl(images / "metadata.jsonl", {images / k: v for k, v in captions.items()})
    result = run_create(
        sample_data,
        "--captions_file",
        str(images / "metadata.jsonl"),
        "--dataset_name",
        "jsonl",
        tiny_model=tiny_model,
    )
    assert result.returncode == 0, result.stderr
    assert_round_trip(sample_data / "datasets" / "jsonl", images, captions)


def test_missing_captions_file_falls_back_to_metadata_jsonl_in_images_dir(sample_data, tiny_model):
    images = sample_data / "images"
    captions = {name: f"from metadata: {caption}" for name, caption in sample_captions(sample_data).items()}
    (sample_data / "image_captions.json").unlink()  # the default --captions_file is now missing
    write_metadata_jsonl(images / "metadata.jsonl", {images / k: v for k, v in captions.items()})
    for name in captions:  # .txt files come last: metadata.jsonl wins over them
        (images / name).with_suffix(".txt").write_text("from a txt file\n")
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert f"captions from {Path('images') / 'metadata.jsonl'}" in result.stdout
    assert_round_trip(sample_data / "datasets" / "Text2Image_example", images, captions)


def test_no_captions_file_or_metadata_falls_back_to_txt_files(sample_data, tiny_model):
    images = sample_data / "images"
    captions = {name: f"from a txt file: {caption}" for name, caption in sample_captions(sample_data).items()}
    for name, caption in captions.items():
        (images / name).with_suffix(".txt").write_text(caption + "\n")
    result = run_create(sample_data, "--captions_file", "missing.json", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert ".txt files" in result.stdout
    assert_round_trip(sample_data / "datasets" / "Text2Image_example", images, captions)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path: to compare a folder byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_dataset_is_kept_without_overwrite(sample_data, tiny_model):
    assert run_create(sample_data, tiny_model=tiny_model).returncode == 0
    dataset = sample_data / "datasets" / "Text2Image_example"
    before = folder_bytes(dataset)
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert folder_bytes(dataset) == before


def test_overwrite_replaces_the_dataset_only_once_the_new_one_is_complete(sample_data, tiny_model):
    assert run_create(sample_data, tiny_model=tiny_model).returncode == 0
    datasets_dir = sample_data / "datasets"
    dataset = datasets_dir / "Text2Image_example"
    before = folder_bytes(dataset)
    # A new build that fails its check: the old dataset stays byte for byte, with nothing left beside it.
    good_png = (sample_data / "images" / "red_circle.png").read_bytes()
    (sample_data / "images" / "red_circle.png").write_bytes(b"not a png")
    result = run_create(sample_data, "--overwrite", tiny_model=tiny_model)
    assert result.returncode == 2 and "not an image" in result.stderr and "Traceback" not in result.stderr
    assert folder_bytes(dataset) == before
    assert [p.name for p in datasets_dir.iterdir()] == [dataset.name]
    # A complete new build replaces it.
    (sample_data / "images" / "red_circle.png").write_bytes(good_png)
    captions = json.loads((sample_data / "image_captions.json").read_text())
    captions["images/red_circle.png"] = "a new caption"
    (sample_data / "image_captions.json").write_text(json.dumps(captions))
    result = run_create(sample_data, "--overwrite", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert "a new caption" in datasets.load_from_disk(str(dataset))["text"]
    assert [p.name for p in datasets_dir.iterdir()] == [dataset.name]


def test_image_changed_after_the_check_leaves_the_old_dataset_intact(sample_data):
    """A file edited between the check and the write stops the write; the old dataset is untouched."""
    from sdlora.captions import read_captions_json
    from sdlora.dataset_builder import build_dataset, check_examples, pair_examples
    from sdlora.dataset_writer import write_dataset
    from sdlora.errors import UserError

    examples, problems = pair_examples(
        sample_data / "images", read_captions_json(sample_data / "image_captions.json"), "captions"
    )
    output = sample_data / "datasets" / "mine"
    build_dataset(examples, output, known_problems=problems)
    before = folder_bytes(output)
    checked, _ = check_examples(examples, known_problems=problems)
    Image.new("RGB", (50, 50), "white").save(examples[-1].image_path)
    with pytest.raises(UserError, match="changed while the dataset was being built"):
        write_dataset(checked, output, overwrite=True)
    assert folder_bytes(output) == before
    assert [p.name for p in output.parent.iterdir()] == ["mine"]


def test_every_image_is_stored_as_rgb_and_plain_rgb_files_keep_their_bytes(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    colour = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    opaque = np.full((40, 48), 255, dtype=np.uint8)
    Image.fromarray(np.dstack([gray, opaque]), "LA").save(images / "la.png")
    Image.fromarray(np.dstack([colour, opaque]), "RGBA").save(images / "rgba.png")
    Image.fromarray(gray, "L").save(images / "gray.png")
    Image.fromarray(colour).save(images / "photo.jpg", quality=90)
    expected = {
        "la.png": np.repeat(gray[..., None], 3, axis=2),
        "rgba.png": colour,
        "gray.png": np.repeat(gray[..., None], 3, axis=2),
        "photo.jpg": np.asarray(Image.open(images / "photo.jpg")),
    }
    (tmp_path / "image_captions.json").write_text(json.dumps({f"images/{n}": n for n in expected}))
    result = run_create(tmp_path, tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    ds = datasets.load_from_disk(str(tmp_path / "datasets" / "Text2Image_example"))
    for row in ds:
        assert row["image"].mode == "RGB", row["text"]
        assert np.array_equal(np.asarray(row["image"]), expected[row["text"]]), row["text"]
    raw = {
        row["text"]: row["image"]["bytes"] for row in ds.cast_column("image", datasets.Image(decode=False))
    }
    assert raw["photo.jpg"] == (images / "photo.jpg").read_bytes()  # no re-encoding of a plain JPEG
    assert raw["la.png"] != (images / "la.png").read_bytes()


def test_fingerprint_follows_the_content(sample_data, tiny_model):
    """The trainer keys its caches and resume checks on the fingerprint: same content, same fingerprint."""

    def fingerprint(name: str) -> str:
        assert run_create(sample_data, "--dataset_name", name, tiny_model=tiny_model).returncode == 0
        return datasets.load_from_disk(str(sample_data / "datasets" / name))._fingerprint

    first, again = fingerprint("a"), fingerprint("b")
    Image.new("RGB", (96, 96), "red").save(sample_data / "images" / "red_circle.png")
    assert first == again != fingerprint("c")


def test_dataset_folder_is_self_contained_and_no_cache_is_left(sample_data, tiny_model, tmp_path):
    home = tmp_path / "hf_home"
    env = {
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    result = run_create(sample_data, tiny_model=tiny_model, env=env)
    assert result.returncode == 0, result.stderr
    dataset = sample_data / "datasets" / "Text2Image_example"
    names = sorted(p.name for p in dataset.iterdir())
    assert names == ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    assert not (home / "datasets").exists() or not any((home / "datasets").iterdir())
    assert [p.name for p in (sample_data / "datasets").iterdir()] == [dataset.name]  # no temporary folders
    moved = tmp_path / "elsewhere"
    dataset.rename(moved)  # nothing refers back to where it was written
    ds = datasets.load_from_disk(str(moved))
    assert len(ds) == 8 and ds[0]["image"].mode == "RGB"


def peak_rss_mb(root: Path, tiny_model: Path) -> float:
    """Peak resident memory of one create_dataset.py run in root, in MB (wait4: this child alone)."""
    command = [
        sys.executable,
        str(REPO / "create_dataset.py"),
        "--pretrained_model_name_or_path",
        str(tiny_model),
    ]
    child = subprocess.Popen(
        command, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE
    )
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, stderr.decode()
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, tiny_model):
    """Images are streamed to disk: 300 images (35 MB of JPEG) need no more memory than 30."""
    rng = np.random.default_rng(0)
    peaks = {}
    for count in (30, 300):
        root = tmp_path / str(count)
        (root / "images").mkdir(parents=True)
        for i in range(count):  # noise compresses badly: about 120 KB per JPEG
            Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(
                root / "images" / f"{i}.jpg"
            )
        captions = {f"images/{i}.jpg": f"photo {i}" for i in range(count)}
        (root / "image_captions.json").write_text(json.dumps(captions))
        peaks[count] = peak_rss_mb(root, tiny_model)
    # The builder that held every image in memory needed 296 MB more for 600 such images (commit cfcea6f).
    assert peaks[300] - peaks[30] < 30, peaks


def _break(kind: str, root: Path) -> str:
    """Make one kind of bad input in a sample-data folder; return a word the error must contain."""
    captions_file = root / "image_captions.json"
    captions = json.loads(captions_file.read_text())
    if kind == "missing_image":
        (root / "images" / "red_circle.png").unlink()
        return "does not exist"
    if kind == "unreadable":
        (root / "images" / "red_circle.png").write_bytes(b"not a png")
        return "not an image"
    if kind == "image_without_caption":
        Image.new("RGB", (70, 70)).save(root / "images" / "extra.png")
        return "no caption"
    if kind == "caption_without_image":
        captions["images/ghost.png"] = "a ghost"
    if kind == "empty_caption":
        captions["images/red_circle.png"] = "   "
    if kind == "outside_folder":
        Image.new("RGB", (70, 70)).save(root / "outside.png")
        captions["outside.png"] = "outside"
    if kind == "malformed_json":
        captions_file.write_text('{"images/red_circle.png": "a red circle",\n')
        return "invalid JSON at line"
    captions_file.write_text(json.dumps(captions))
    return {
        "caption_without_image": "does not exist",
        "empty_caption": "empty caption",
        "outside_folder": "outside",
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "missing_image",
        "unreadable",
        "image_without_caption",
        "caption_without_image",
        "empty_caption",
        "outside_folder",
        "malformed_json",
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(sample_data, tiny_model, kind):
    words = _break(kind, sample_data)
    before = (sample_data / "image_captions.json").read_bytes()
    result = run_create(sample_data, tiny_model=tiny_model)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sample_data / "datasets").exists() or not any((sample_data / "datasets").iterdir())
    assert (sample_data / "image_captions.json").read_bytes() == before


def test_skip_invalid_builds_from_the_rest(sample_data, tiny_model):
    (sample_data / "images" / "red_circle.png").write_bytes(b"")
    Image.new("RGB", (70, 70)).save(sample_data / "images" / "extra.png")
    result = run_create(sample_data, "--skip_invalid", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert "empty file" in result.stderr and "no caption" in result.stderr  # both listed, not just the first
    assert len(datasets.load_from_disk(str(sample_data / "datasets" / "Text2Image_example"))) == 7


def test_image_corpus_through_the_builder(tmp_path, tiny_model):
    """Odd but valid files build, with conversions counted; every invalid file is listed at once."""
    from image_corpus import invalid, odd_but_valid

    images = tmp_path / "images"
    odd = odd_but_valid(images)
    long_caption = " ".join(["a red circle on a blue background"] * 20)
    captions = {f"images/{name}": ("一只猫 " if name == "gray.png" else "") + name for name in odd}
    captions["images/cmyk.jpg"] = long_caption
    (tmp_path / "image_captions.json").write_text(json.dumps(captions, ensure_ascii=False), encoding="utf-8")
    result = run_create(tmp_path, "--resolution", "128", tiny_model=tiny_model)
    assert result.returncode == 0, result.stderr
    assert f"{len(odd)} images" in result.stdout
    assert "smaller than 128" in result.stdout and "longer than 77 tokens" in result.stdout
    assert (
        "transparency" in result.stdout and "animated" in result.stdout and "rotated upright" in result.stdout
    )
    ds = datasets.load_from_disk(str(tmp_path / "datasets" / "Text2Image_example"))
    assert "一只猫 gray.png" in ds["text"]  # non-ASCII captions pass through intact
    assert all(row["image"].mode == "RGB" for row in ds)
    rotated = next(row["image"] for row in ds if row["text"] == "exif_rotated.jpg")
    assert rotated.size == (64, 80)  # stored upright

    bad = invalid(images)
    for name in bad:
        captions[f"images/{name}"] = name
    (tmp_path / "image_captions.json").write_text(json.dumps(captions), encoding="utf-8")
    result = run_create(tmp_path, "--dataset_name", "with_bad", tiny_model=tiny_model)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for name in bad:
        assert name in result.stderr
    assert not (tmp_path / "datasets" / "with_bad").exists()


# create_dataset.py's main, run in the small disk's process: each run's exit status and its stderr and
# stdout, one JSON line per run.
CREATE = """
import contextlib, io, json
import create_dataset
from sdlora.errors import run_cli

def create(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(create_dataset.main, create_dataset.parse_args(list(argv)))
            code = 0
        except SystemExit as e:
            code = e.code
    print(json.dumps({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}), flush=True)

def folder_digest(folder):
    import hashlib
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()

model = ["--pretrained_model_name_or_path", sys.argv[2]]
"""

FULL_OUTPUT = """
small = ["--images_dir", sys.argv[3] + "/images", "--captions_file", sys.argv[3] + "/image_captions.json"]
big = ["--images_dir", sys.argv[4] + "/images", "--captions_file", sys.argv[4] + "/image_captions.json"]
create(*model, *small, "--output_dir", str(root / "datasets"))
before = folder_digest(root / "datasets" / "Text2Image_example")
create(*model, *big, "--output_dir", str(root / "datasets"), "--overwrite")  # 3 MB on a 2 MB disk
print(json.dumps({
    "unchanged": folder_digest(root / "datasets" / "Text2Image_example") == before,
    "left": sorted(p.name for p in (root / "datasets").iterdir()),
}))
"""


def test_a_disk_that_fills_during_the_build_ends_in_one_error_line_and_keeps_the_old_dataset(
    tmp_path, sample_data, tiny_model
):
    big = tmp_path / "big"
    (big / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):  # noise does not compress: 1.5 MB of PNG each
        Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(big / "images" / f"{i}.png")
    (big / "image_captions.json").write_text(json.dumps({f"images/{i}.png": f"noise {i}" for i in range(2)}))
    code = CREATE + FULL_OUTPUT
    result = run_on_small_disk(tmp_path, code, extra=[str(tiny_model), str(sample_data), str(big)])
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(runs) == 3, result.stdout + result.stderr
    assert runs[0]["code"] == 0, runs[0]["stderr"]
    dataset = tmp_path / "disk" / "datasets" / "Text2Image_example"
    err = runs[1]["stderr"]
    assert runs[1]["code"] == 2 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: {dataset}: could not be written (No space left on device); free some space"
    )
    assert runs[2] == {"unchanged": True, "left": ["Text2Image_example"]}  # no half-written folder beside it


def test_a_read_only_output_dir_is_one_error_line_before_any_image_is_read(tmp_path, sample_data, tiny_model):
    code = CREATE + 'create(*model, "--images_dir", sys.argv[3] + "/images", "--captions_file", '
    code += 'sys.argv[3] + "/image_captions.json", "--output_dir", str(root / "datasets"))'
    result = run_on_small_disk(tmp_path, code, "ro,size=2m", extra=[str(tiny_model), str(sample_data)])
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(runs) == 1, result.stdout + result.stderr
    folder = tmp_path / "disk" / "datasets"
    assert runs[0]["code"] == 2
    assert runs[0]["stderr"] == (
        f"error: {folder}: cannot write there (Read-only file system); pass another --output_dir\n"
    )
    assert runs[0]["stdout"] == ""  # no image checked, no caption counted


# Several captions, masks and kept alpha: run in this process on tiny images (a subprocess costs seconds).
# A 4x3 RGB PNG, fixed bytes (not re-encoded by whatever Pillow/zlib is installed), stored as it is.
RED_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAQAAAADCAIAAAA7ljmRAAAAGElEQVR4nGM8wYAATBDKSUSOgYGBEVkGAC/rAgmJgdSmAAAAAElFTkSuQmCC"
)
# What create_dataset.py wrote before lists, masks and --keep_alpha existed for RED_PNG as images/red.png
# captioned "a red square" (commit before issue 22's dataset work): the trainer's caches key on it.
RED_FINGERPRINT = "8427cb6b8c67bd4b"


def create(capsys, *argv: str) -> tuple[int, str, str]:
    """create_dataset.py in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        run_cli(create_dataset.main, create_dataset.parse_args(list(argv)))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def build(capsys, root: Path, *argv: str, name: str = "ds", tokenizer: Path | None = None):
    """Build <root>/out/<name> from <root>/images (captions from root/image_captions.json, else beside the
    images); return (status, stdout, stderr, the dataset folder)."""
    model = ["--pretrained_model_name_or_path", str(tokenizer or root / "no-model")]
    images = ["--images_dir", str(root / "images"), "--captions_file", str(root / "image_captions.json")]
    code, out, err = create(
        capsys, *model, *images, "--output_dir", str(root / "out"), "--dataset_name", name, *argv
    )
    return code, out, err, root / "out" / name


def fingerprint_of(dataset: Path) -> str:
    return json.loads((dataset / "state.json").read_text())["_fingerprint"]


def solid(path: Path, size: tuple[int, int], colour, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_single_captions_keep_the_string_column_and_the_fingerprint_they_had(tmp_path, capsys):
    """Today's inputs write today's dataset: a string column and the fingerprint the old builder wrote."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(RED_PNG)
    (tmp_path / "images" / "red.txt").write_text("  a red square \n\n")  # one line: one caption, stripped
    code, _, err, txt = build(capsys, tmp_path, name="txt")
    assert code == 0, err
    (tmp_path / "image_captions.json").write_text(json.dumps({"images/red.png": ["a red square"]}))
    code, _, err, json_list = build(capsys, tmp_path, name="json")  # a list of one is one caption
    assert code == 0, err
    for dataset in (txt, json_list):
        ds = datasets.load_from_disk(str(dataset))
        assert ds.features == datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        assert ds["text"] == ["a red square"]
        assert fingerprint_of(dataset) == RED_FINGERPRINT


def test_several_captions_per_image_make_every_row_a_list(tmp_path, capsys, tiny_model):
    images = tmp_path / "images"
    solid(images / "cat.png", (8, 6), "red")
    solid(images / "dog.png", (8, 6), "blue")
    long_caption = " ".join(["a red circle on a blue background"] * 20)
    expected = {"cat.png": ["a red cat", "a cat", long_caption], "dog.png": ["a blue dog"]}
    sources = {
        "json": lambda: (tmp_path / "image_captions.json").write_text(
            json.dumps({"images/cat.png": expected["cat.png"], "images/dog.png": "a blue dog"})
        ),
        "jsonl": lambda: (images / "metadata.jsonl").write_text(
            json.dumps({"file_name": "cat.png", "text": expected["cat.png"]})
            + "\n"
            + json.dumps({"file_name": "dog.png", "text": "a blue dog"})
            + "\n"
        ),
        "txt": lambda: [
            (images / "cat.txt").write_text(f"a red cat\n\n  a cat  \n{long_caption}\n"),
            (images / "dog.txt").write_text("a blue dog\n"),
        ],
    }
    fingerprints = set()
    for fmt, write in sources.items():
        for leftover in (tmp_path / "image_captions.json", images / "metadata.jsonl"):
            leftover.unlink(missing_ok=True)
        write()
        code, out, err, dataset = build(capsys, tmp_path, name=fmt, tokenizer=tiny_model)
        assert code == 0, err
        assert "1 images with several captions" in out, fmt
        assert "1 captions longer than 77 tokens" in out, fmt  # each caption is counted
        ds = datasets.load_from_disk(str(dataset))
        assert ds.features["text"] == datasets.List(datasets.Value("string")), fmt
        by_name = {
            row["image"]["path"]: row["text"] for row in ds.cast_column("image", datasets.Image(decode=False))
        }
        assert by_name == expected, fmt
        assert [options(t) for t in ds["text"]] == ds["text"]  # the trainer's caption choices
        fingerprints.add(fingerprint_of(dataset))
    assert len(fingerprints) == 1  # same content from any of the three formats, same fingerprint
    (images / "cat.txt").write_text("a red cat\n")
    code, _, err, single = build(capsys, tmp_path, name="single", tokenizer=tiny_model)
    assert code == 0, err
    assert datasets.load_from_disk(str(single)).features["text"] == datasets.Value("string")
    assert fingerprint_of(single) not in fingerprints


def exif_rotated(path: Path, size: tuple[int, int]) -> None:
    """A JPEG stored at `size` whose EXIF says to rotate it by 90 degrees: upright it is size[::-1]."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", size, "green").save(path, exif=exif)


def test_masks_dir_writes_a_grayscale_mask_column_at_each_images_size(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    solid(images / "a.png", (8, 6), "red")
    (images / "sub").mkdir()
    exif_rotated(images / "sub" / "b.jpg", (10, 4))  # upright 4x10
    pattern = np.zeros((6, 8), dtype=np.uint8)
    pattern[1:4, 2:7] = 255
    pattern[5, 0] = 128
    (masks / "deep").mkdir(parents=True)
    Image.fromarray(pattern, "L").save(masks / "deep" / "a.png")  # found anywhere under --masks_dir
    solid(masks / "b.png", (4, 10), (255, 255, 255))  # an RGB mask is stored as grayscale
    (tmp_path / "image_captions.json").write_text(json.dumps({"images/a.png": "a", "images/sub/b.jpg": "b"}))
    code, out, err, dataset = build(capsys, tmp_path, "--masks_dir", str(masks), name="masked")
    assert code == 0, err
    assert "2 masks" in out
    ds = datasets.load_from_disk(str(dataset))
    assert ds.column_names == ["image", "text", "mask"]
    assert ds.features["mask"] == datasets.Image() and ds.features["text"] == datasets.Value("string")
    rows = {row["text"]: row for row in ds}
    for text, expected in (("a", pattern), ("b", np.full((10, 4), 255, dtype=np.uint8))):
        mask = rows[text]["mask"]
        assert mask.mode == "L" and mask.size == rows[text]["image"].size, text
        assert np.array_equal(np.asarray(mask), expected), text
    raw = ds.cast_column("mask", datasets.Image(decode=False))
    assert all(row["mask"]["bytes"].startswith(b"\x89PNG") for row in raw)
    # The trainer's --masked_loss --mask_column mask reads the same masks, and finds nothing wrong.
    from types import SimpleNamespace

    from sdlora.data.masks import MaskSource
    from sdlora.data.sources import DatasetSource, load_train_dataset

    train = load_train_dataset(DatasetSource(disk_path=str(dataset)))
    view = SimpleNamespace(dataset=train, image_column="image", sizes=[(8, 6), (4, 10)])
    column = MaskSource(column="mask")
    assert np.array_equal(np.asarray(column.load(view, 0)), pattern)
    assert column.problems(view, [0, 1]) == []
    # The masks enter the fingerprint: without them, or with one pixel changed, it is another dataset.
    code, _, err, plain = build(capsys, tmp_path, name="plain")
    assert code == 0, err
    pattern[0, 0] = 255
    Image.fromarray(pattern, "L").save(masks / "deep" / "a.png")
    code, _, err, edited = build(capsys, tmp_path, "--masks_dir", str(masks), name="edited")
    assert code == 0, err
    assert len({fingerprint_of(plain), fingerprint_of(dataset), fingerprint_of(edited)}) == 3


def test_keep_alpha_stores_transparent_images_as_rgba_and_only_then(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    alpha = np.tile(np.array([0, 64, 128, 255], dtype=np.uint8), (6, 2))
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(images / "rgba.png")
    Image.fromarray(np.dstack([colour[..., 0], alpha]), "LA").save(images / "la.png")
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10])
    palette.putpixel((0, 0), 0)
    palette.save(images / "p.png", transparency=0)
    (images / "opaque.png").write_bytes(RED_PNG)
    names = ("rgba.png", "la.png", "p.png", "opaque.png")
    (tmp_path / "image_captions.json").write_text(json.dumps({f"images/{n}": n for n in names}))
    code, out, err, kept = build(capsys, tmp_path, "--keep_alpha", name="kept")
    assert code == 0, err
    assert "3 images with transparency kept as RGBA" in out and "composited" not in out
    code, out, err, composited = build(capsys, tmp_path, name="composited")
    assert code == 0, err
    assert "3 with transparency composited" in out
    with_alpha = {row["text"]: row["image"] for row in datasets.load_from_disk(str(kept))}
    without = {row["text"]: row["image"] for row in datasets.load_from_disk(str(composited))}
    assert {n: with_alpha[n].mode for n in names} == {
        "rgba.png": "RGBA",
        "la.png": "RGBA",
        "p.png": "RGBA",
        "opaque.png": "RGB",
    }
    assert all(image.mode == "RGB" for image in without.values())
    assert np.array_equal(np.asarray(with_alpha["rgba.png"]), np.dstack([colour, alpha]))
    assert np.array_equal(np.asarray(with_alpha["la.png"].getchannel("A")), alpha)
    assert with_alpha["p.png"].getchannel("A").getpixel((0, 0)) == 0
    assert with_alpha["p.png"].getchannel("A").getpixel((1, 0)) == 255
    # What the trainer does with them: composites on its own --background (like create_dataset.py
    # without --keep_alpha), or reads the alpha as the mask with --alpha_mask.
    from sdlora.images import load_image

    assert np.array_equal(
        np.asarray(load_image(with_alpha["rgba.png"]).image), np.asarray(without["rgba.png"])
    )
    raw = datasets.load_from_disk(str(kept)).cast_column("image", datasets.Image(decode=False))
    opaque = next(row["image"]["bytes"] for row in raw if row["text"] == "opaque.png")
    assert opaque == RED_PNG  # a plain RGB file keeps its bytes
    assert fingerprint_of(kept) != fingerprint_of(composited)


def test_bad_masks_and_caption_lists_are_listed_together_one_line_each(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("good", "no_mask", "wrong_size", "rotated", "bad_mask", "empty_entry"):
        solid(images / f"{name}.png", (8, 6), "red")
    (images / "rotated.png").unlink()
    exif_rotated(images / "rotated.jpg", (8, 6))  # upright 6x8: a mask of the stored 8x6 is the wrong size
    for name in ("good", "rotated", "empty_entry"):
        solid(masks / f"{name}.png", (8, 6), 255, "L")
    solid(masks / "wrong_size.png", (6, 6), 255, "L")
    (masks / "bad_mask.png").write_bytes(b"not a png")
    solid(masks / "orphan.png", (8, 6), 255, "L")
    solid(masks / "again" / "good.png", (8, 6), 255, "L")
    captions = {f"images/{p.name}": p.stem for p in images.iterdir()}
    captions["images/empty_entry.png"] = ["a caption", " "]
    (tmp_path / "image_captions.json").write_text(json.dumps(captions))
    code, out, err, dataset = build(capsys, tmp_path, "--masks_dir", str(masks), name="bad")
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    expected = {
        "caption 2 of 2 for": "empty_entry.png",
        "no mask named like it": "no_mask.png",
        "6x6, but its image": "wrong_size.png",
        "8x6, but its image": "rotated.jpg",
        "not an image Pillow can read": "bad_mask.png",
        "a mask without an image": "orphan.png",
        "a second mask for images named 'good'": "good.png",
    }
    for words, file in expected.items():
        matching = [line for line in lines if words in line]
        assert len(matching) == 1 and file in matching[0], (words, err)
    assert len(lines) == len(expected) + 1  # one line each, then the summary
    assert not dataset.exists()
    code, _, err, dataset = build(capsys, tmp_path, "--masks_dir", str(masks), "--skip_invalid", name="rest")
    assert code == 0, err
    assert sorted(datasets.load_from_disk(str(dataset))["text"]) == ["good"]
    (tmp_path / "image_captions.json").write_text(json.dumps({"images/good.png": ["a", 3]}))
    code, _, err, _ = build(capsys, tmp_path, name="not_strings")
    assert code == 2 and err.count("\n") == 1 and "is not a string or a list of strings" in err, err
