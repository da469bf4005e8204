"""Caches: any change to data, captions, encoder weights or preprocessing gives a new key, and the disk
cache reads back exactly what the memory cache holds, in shards any number of processes share."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL
from test_fileio import run_on_small_disk
from transformers import CLIPTextModel, CLIPTokenizer

from sdlora.cache import (
    SHARD_SIZE,
    ShardReader,
    TensorStore,
    latent_cache_key,
    module_fingerprint,
    text_cache_key,
)


@pytest.fixture(scope="module")
def parts(tiny_model):
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    text = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    return vae, text, tokenizer


def settings(**changes):
    base = dict(
        buckets={
            "mode": "bucket",
            "resolution": 64,
            "step": 16,
            "min_reso": 32,
            "max_reso": 128,
            "no_upscale": False,
        },
        flip=True,
        interpolation="lanczos",
        background=(255, 255, 255),
    )
    return {**base, **changes}


def nudged(module: torch.nn.Module, name: str) -> torch.nn.Module:
    """A copy of module with one element of weight `name` changed, an element between the ~64 evenly
    spaced ones a sampling fingerprint would read (a fine-tuned VAE differs in a few weights only)."""
    module = copy.deepcopy(module)
    flat = module.get_parameter(name).data.view(-1)
    stride = max(1, flat.numel() // 64)
    assert stride > 2, name
    i = 3 * stride + stride // 2
    before = flat[i].item()
    flat[i] += 1e-2 * abs(before) + 1e-3  # (relative: a bf16 weight must change too)
    assert flat[i].item() != before
    return module


# One change to each setting the latents depend on.
SETTING_CHANGES = {
    "buckets.mode": {"mode": "center"},
    "buckets.resolution": {"resolution": 96},
    "buckets.step": {"step": 32},
    "buckets.min_reso": {"min_reso": 16},
    "buckets.max_reso": {"max_reso": 256},
    "buckets.no_upscale": {"no_upscale": True},
    "flip": False,
    "interpolation": "bilinear",
    "background": (0, 0, 0),
}


def test_latent_key_changes_with_each_input_alone(parts):
    vae = parts[0]
    key = latent_cache_key("data-a", vae, settings(), torch.float32)
    assert key == latent_cache_key("data-a", copy.deepcopy(vae), settings(), torch.float32)
    changed = {
        "dataset": latent_cache_key("data-b", vae, settings(), torch.float32),
        "dtype": latent_cache_key("data-a", vae, settings(), torch.bfloat16),
        "encoder weight": latent_cache_key(
            "data-a", nudged(vae, "encoder.mid_block.resnets.0.conv1.weight"), settings(), torch.float32
        ),
    }
    for name, change in SETTING_CHANGES.items():
        if name.startswith("buckets."):
            change = {"buckets": {**settings()["buckets"], **change}}
        else:
            change = {name: change}
        changed[name] = latent_cache_key("data-a", vae, settings(**change), torch.float32)
    assert [name for name, other in changed.items() if other == key] == []
    assert len(set(changed.values())) == len(changed)


def test_fingerprint_reads_every_element_of_bf16_weights(parts):
    vae = copy.deepcopy(parts[0]).to(torch.bfloat16)
    name = "encoder.down_blocks.1.resnets.0.conv2.weight"
    assert module_fingerprint(vae) == module_fingerprint(copy.deepcopy(vae))
    assert module_fingerprint(vae) != module_fingerprint(nudged(vae, name))
    assert module_fingerprint(vae) != module_fingerprint(parts[0])  # fp32 weights: other bytes


def test_text_key_covers_the_captions_encoded_the_tokenizer_and_the_encoder(parts):
    _, text, tokenizer = parts
    key = text_cache_key(["a cat", "a dog"], [text], [tokenizer], torch.float32)
    # Another caption column of the same dataset: same fingerprint, other captions, so another key.
    assert key != text_cache_key(["a cat", "a red dog"], [text], [tokenizer], torch.float32)
    tokenizer.model_max_length = 60
    assert key != text_cache_key(["a cat", "a dog"], [text], [tokenizer], torch.float32)
    tokenizer.model_max_length = 77
    assert key == text_cache_key(["a cat", "a dog"], [text], [tokenizer], torch.float32)
    fc1 = next(n for n, _ in text.named_parameters() if n.endswith("layers.0.mlp.fc1.weight"))
    nudged_text = nudged(text, fc1)
    assert key != text_cache_key(["a cat", "a dog"], [nudged_text], [tokenizer], torch.float32)


def entries(indices):
    """Items of different shapes, as bucketed latents are."""
    return [{"x": torch.full((2, 1 + i % 3, 4), float(i)), "n": torch.tensor([i, -i])} for i in indices]


def test_disk_store_reads_back_what_the_memory_store_holds(tmp_path):
    n = SHARD_SIZE + 10  # two shards, the second partial
    memory = TensorStore(n, ["x", "n"], None, True)
    memory.fill(entries, 0, 1, lambda: None)
    disk = TensorStore(n, ["x", "n"], tmp_path / "c", in_memory=False)
    disk.fill(entries, 0, 1, lambda: None)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    for i in (0, 5, SHARD_SIZE, n - 1):
        assert all(torch.equal(memory[i][k], disk[i][k]) for k in ("x", "n"))


def test_each_process_writes_its_own_shards_and_all_read_all(tmp_path):
    import threading

    n, world, calls = 3 * SHARD_SIZE, 2, {0: [], 1: []}
    barrier = threading.Barrier(world)

    def process(rank, store):
        def encode(indices):
            calls[rank].append((indices[0], len(indices)))
            return entries(indices)

        store.fill(encode, rank, world, barrier.wait)

    # Two processes (threads here) share the folder and meet at the barrier, as accelerate's would.
    stores = [TensorStore(n, ["x", "n"], tmp_path, in_memory=True) for _ in range(world)]
    threads = [threading.Thread(target=process, args=(r, stores[r])) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == {0: [(0, SHARD_SIZE), (2 * SHARD_SIZE, SHARD_SIZE)], 1: [(SHARD_SIZE, SHARD_SIZE)]}
    for store in stores:
        assert all(torch.equal(store[i]["x"], entries([i])[0]["x"]) for i in (0, SHARD_SIZE, n - 1))
    # A resumed run finds every shard written and encodes nothing.
    again = TensorStore(n, ["x", "n"], tmp_path, in_memory=False)
    again.fill(lambda indices: pytest.fail("re-encoded"), 0, 1, lambda: None)
    assert torch.equal(again[n - 1]["n"], entries([n - 1])[0]["n"])


def resident_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6


def test_disk_store_reads_on_demand_without_growing_memory(tmp_path):
    big = lambda indices: [{"x": torch.full((256, 256), float(i))} for i in indices]  # noqa: E731 - 256 KB each
    store = TensorStore(SHARD_SIZE, ["x"], tmp_path, in_memory=False)
    store.fill(big, 0, 1, lambda: None)
    before = resident_mb()
    total = sum(float(store[i]["x"][0, 0]) for i in range(SHARD_SIZE))  # reads 64 MB, one item at a time
    # (a memory-mapped read would keep most of the 64 MB resident: measured 55 MB with safe_open)
    assert total == sum(range(SHARD_SIZE)) and resident_mb() - before < 16


def test_shard_reader_reads_safetensors_written_by_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"k": "v"})
    reader = ShardReader(tmp_path / "f.safetensors")
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


FULL_CACHE = """
import os
os.environ["SDLORA_CACHE_SHARD_SIZE"] = "4"  # shards of 1.5 MB: the first fits the 2 MB disk, the second not
import torch
from sdlora.cache import TensorStore
from sdlora.errors import run_cli

folder = root / "latents-0123456789abcdef"
store = TensorStore(8, ["x"], folder, in_memory=False)
try:
    run_cli(store.fill, lambda idx: [{"x": torch.zeros(96, 1024)} for _ in idx], 0, 1, lambda: None)
finally:
    print(sorted(p.name for p in folder.iterdir()))
"""


def test_a_full_cache_disk_ends_in_one_error_line_and_leaves_no_partial_shard(tmp_path):
    result = run_on_small_disk(tmp_path, FULL_CACHE)
    folder = tmp_path / "disk" / "latents-0123456789abcdef"
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {folder}: "), result.stderr
    for advice in ("free some space", "another --latents_cache_dir", "drop --cache_latents_to_disk"):
        assert advice in result.stderr
    assert result.stdout.splitlines() == ["['shard-00000.safetensors']"]  # the whole shard, nothing partial
