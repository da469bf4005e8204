"""Held-out validation loss: the split, the fixed probes, the deterministic loss, best/ and early stopping."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdlora.errors import UserError
from sdlora.families import SDXL, Geometry
from sdlora.heldout import (
    BEST_COLOR,
    TRAIN_COLOR,
    VAL_COLOR,
    BestTracker,
    ProbeExample,
    append_csv,
    collate_inputs,
    heldout_loss,
    mean_loss,
    plot_loss_curve,
    probe_noise,
    probe_timesteps,
    read_best,
    read_csv,
    save_best,
    split_examples,
    split_inputs,
    train_probe_indices,
    truncate_csv,
)
from sdlora.objectives import DiffusionObjective

# --- the split -------------------------------------------------------------------------------------------


def test_split_is_a_pure_function_of_the_seed():
    assert split_examples(50, "0.2", seed=7) == split_examples(50, "0.2", seed=7)
    assert split_examples(50, "0.2", seed=7)[1] != split_examples(50, "0.2", seed=8)[1]


def test_split_does_not_touch_numpys_global_rng():
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    split_examples(50, "5", seed=0)
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.parametrize(
    "n, split, held",
    [(10, "0.1", 1), (25, "0.1", 3), (3, "0.1", 1), (20, "8", 8), (20, " 0.25 ", 5), (2, "1", 1)],
)
def test_split_holds_out_a_rounded_fraction_or_a_count(n, split, held):
    train, heldout = split_examples(n, split, seed=0)
    assert len(heldout) == held
    assert train == sorted(train) and heldout == sorted(heldout)
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(range(n))


@pytest.mark.parametrize("split", ["0", "-1", "1.0", "1.5", "-0.1", "abc", "", "nan", "inf", "2.5"])
def test_split_refuses_values_that_are_not_a_fraction_or_a_positive_count(split):
    with pytest.raises(UserError, match="--validation_split") as e:
        split_examples(20, split, seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n, split", [(8, "8"), (8, "9"), (1, "0.5"), (1, "1"), (0, "0.1")])
def test_split_refuses_to_leave_no_training_image(n, split):
    with pytest.raises(UserError, match="leaves none to train on") as e:
        split_examples(n, split, seed=0)
    assert "--validation_split" in str(e.value) and "\n" not in str(e.value)


def test_train_probes_are_a_fixed_sorted_sample_of_the_training_images():
    train, _ = split_examples(40, "0.25", seed=3)
    probes = train_probe_indices(train, 10, seed=3)
    assert probes == train_probe_indices(train, 10, seed=3)
    assert probes != train_probe_indices(train, 10, seed=4)
    assert len(probes) == len(set(probes)) == 10 and probes == sorted(probes)
    assert set(probes) <= set(train)
    assert train_probe_indices(train[:4], 10, seed=3) == sorted(train[:4])  # k is capped at the training set


# --- probe timesteps and noise ---------------------------------------------------------------------------


def test_probe_timesteps_are_evenly_spaced_interval_centres():
    assert probe_timesteps(8, 1000) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert probe_timesteps(1, 1000) == [500]
    assert probe_timesteps(1000, 1000) == list(range(1000))


@pytest.mark.parametrize("count", [0, -1, 1001])
def test_probe_timesteps_refuse_impossible_counts(count):
    with pytest.raises(UserError, match="--validation_loss_timesteps"):
        probe_timesteps(count, 1000)


def test_probe_noise_is_fixed_whatever_the_global_rng_state():
    torch.manual_seed(0)
    a = probe_noise(7, 3, 62, (4, 8, 8))
    torch.manual_seed(12345)
    torch.randn(100)
    state = torch.random.get_rng_state()
    b = probe_noise(7, 3, 62, (4, 8, 8))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (4, 8, 8)
    for other in (
        probe_noise(8, 3, 62, (4, 8, 8)),
        probe_noise(7, 4, 62, (4, 8, 8)),
        probe_noise(7, 3, 187, (4, 8, 8)),
    ):
        assert not torch.equal(a, other)


# --- the loss --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")


@pytest.fixture(scope="module")
def scheduler(tiny_model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler")


@pytest.fixture(scope="module")
def v_scheduler(scheduler):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")


def make_examples(shapes, seed=0, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    return [
        ProbeExample(
            index=10 + i,
            latents=torch.randn(shape, generator=g),
            unet_inputs={"encoder_hidden_states": torch.randn(77, text_dim, generator=g)},
        )
        for i, shape in enumerate(shapes)
    ]


TIMESTEPS = probe_timesteps(4, 1000)
SHAPES = [(4, 8, 8), (4, 6, 10), (4, 8, 8)]  # two aspect-ratio buckets, interleaved


def loss(unet, examples, scheduler, **kw):
    objective = DiffusionObjective(scheduler, scheduler.config.prediction_type)
    return heldout_loss(unet, examples, TIMESTEPS, objective, seed=5, dtype=torch.float32, device="cpu", **kw)


def test_heldout_loss_is_identical_when_repeated_and_leaves_the_global_rng_alone(unet, scheduler):
    examples = make_examples(SHAPES)
    state = torch.random.get_rng_state()
    first = loss(unet, examples, scheduler, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(99)  # a different global state must not matter either
    assert loss(unet, examples, scheduler, batch_size=3) == first
    assert list(first) == TIMESTEPS and all(math.isfinite(v) and v > 0 for v in first.values())


def test_heldout_loss_matches_a_hand_computed_mse_per_example(unet, scheduler, v_scheduler):
    """Each (example, timestep) is scored once with its own probe noise against the scheduler's target,
    whatever the batching and however the buckets interleave."""
    examples = make_examples(SHAPES)
    for sched in (scheduler, v_scheduler):
        expected = {}
        for t in TIMESTEPS:
            per_example = []
            for e in examples:
                noise = probe_noise(5, e.index, t, e.latents.shape)[None]
                latents, steps = e.latents[None], torch.tensor([t])
                noisy = sched.add_noise(latents, noise, steps)
                target = noise if sched is scheduler else sched.get_velocity(latents, noise, steps)
                with torch.no_grad():
                    pred = unet(noisy, steps, e.unet_inputs["encoder_hidden_states"][None]).sample
                per_example.append(F.mse_loss(pred, target).item())
            expected[t] = sum(per_example) / len(per_example)
        for batch_size in (1, 8):
            got = loss(unet, examples, sched, batch_size=batch_size)
            assert got == pytest.approx(expected, rel=1e-5)
    assert loss(unet, examples, v_scheduler) != loss(unet, examples, scheduler)


def test_heldout_loss_runs_in_eval_mode_and_restores_the_previous_mode(unet, scheduler):
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        for mode in (True, False):
            unet.train(mode)
            loss(unet, make_examples(SHAPES[:1]), scheduler)
            assert unet.training is mode
            assert all(m.training is mode for m in unet.modules())
        unet.train()
        unet.conv_in.eval()  # a mixed model comes back mixed
        loss(unet, make_examples(SHAPES[:1]), scheduler)
        assert unet.training and not unet.conv_in.training and unet.conv_out.training
    finally:
        hook.remove()
        unet.eval()
    assert seen and not any(seen)


def test_heldout_loss_changes_when_the_weights_change(unet, scheduler):
    examples = make_examples(SHAPES)
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        changed.conv_out.weight.add_(0.05)
    assert loss(changed, examples, scheduler) != loss(unet, examples, scheduler)


def test_heldout_loss_batches_sdxl_style_nested_conditioning():
    """SDXL's added_cond_kwargs (pooled text, size/crop ids) are stacked per example like the text."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    xl_unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    g = torch.Generator().manual_seed(1)
    geometry = [Geometry((64, 64), (0, 0), (64, 64)), Geometry((80, 48), (0, 0), (80, 48))]
    batched = SDXL.denoiser_inputs(
        {"prompt_embeds": torch.randn(3, 77, 64, generator=g), "pooled": torch.randn(3, 32, generator=g)},
        [*geometry, Geometry((64, 64), (8, 0), (64, 64))],
        "cpu",
        torch.float32,
    )
    per_example = split_inputs(batched)
    assert per_example[1]["added_cond_kwargs"]["time_ids"].tolist() == [48, 80, 0, 0, 48, 80]
    restacked = collate_inputs(per_example, "cpu", torch.float32)
    assert torch.equal(
        restacked["added_cond_kwargs"]["text_embeds"], batched["added_cond_kwargs"]["text_embeds"]
    )
    examples = [
        ProbeExample(i, torch.randn(shape, generator=g), inputs)
        for i, (shape, inputs) in enumerate(zip(SHAPES, per_example))
    ]
    objective = DiffusionObjective(DDPMScheduler())
    got = heldout_loss(xl_unet, examples, TIMESTEPS, objective, seed=5, dtype=torch.float32, device="cpu")
    assert got == heldout_loss(
        xl_unet, examples, TIMESTEPS, objective, seed=5, dtype=torch.float32, device="cpu"
    )
    assert all(math.isfinite(v) for v in got.values())


def test_collate_inputs_casts_floating_tensors_to_the_unet_dtype():
    batch = collate_inputs(
        [{"a": torch.zeros(2), "ids": torch.zeros(2, dtype=torch.long)}] * 3, "cpu", torch.bfloat16
    )
    assert (
        batch["a"].shape == (3, 2) and batch["a"].dtype == torch.bfloat16 and batch["ids"].dtype == torch.long
    )


def test_mean_loss_weighs_every_timestep_the_same():
    assert mean_loss({62: 1.0, 187: 2.0, 312: 6.0}) == 3.0


# --- best step and early stopping ------------------------------------------------------------------------


def test_best_tracker_records_improvements_and_counts_evaluations_since():
    tracker = BestTracker(patience=2)
    assert tracker.update(100, 0.5)  # the first evaluation is the best so far
    assert tracker.update(200, 0.4)
    assert not tracker.update(300, 0.45) and not tracker.should_stop
    assert tracker.update(400, 0.3) and tracker.bad_evals == 0  # an improvement resets the count
    assert not tracker.update(500, 0.3)  # equal is not better
    assert not tracker.update(600, 0.31)
    assert tracker.should_stop
    assert (tracker.best_step, tracker.best_loss, tracker.bad_evals) == (400, 0.3, 2)


def test_best_tracker_ignores_gains_within_min_delta():
    tracker = BestTracker(patience=1, min_delta=0.01)
    tracker.update(1, 0.5)
    assert not tracker.update(2, 0.495)  # better, but by less than min_delta
    assert tracker.best_step == 1 and tracker.should_stop
    assert tracker.update(3, 0.48)


def test_best_tracker_never_stops_without_patience_and_never_takes_a_nan():
    tracker = BestTracker()
    assert not tracker.update(1, float("nan"))
    assert tracker.best_loss is None
    assert tracker.update(2, 1.0)
    for step in range(3, 50):
        tracker.update(step, 2.0)
    assert not tracker.should_stop


def test_best_tracker_state_round_trips_through_json():
    tracker = BestTracker(patience=3, min_delta=0.001)
    for step, value in ((10, 0.5), (20, 0.25), (30, 0.3)):
        tracker.update(step, value)
    state = json.loads(json.dumps(tracker.state_dict()))
    restored = BestTracker.from_state(state, patience=3, min_delta=0.001)
    assert restored == tracker
    assert restored.update(40, 0.3) == tracker.update(40, 0.3)
    assert restored == tracker


# --- the CSV and the curve -------------------------------------------------------------------------------


def test_csv_appends_truncates_and_reads_back_exact_floats(tmp_path):
    path = tmp_path / "validation_loss.csv"
    assert read_csv(path) == []
    truncate_csv(path, 10)  # nothing to truncate
    for step in (10, 20, 30):
        append_csv(path, step, 0.1 * step / 3, None if step == 20 else 1 / step, {62: step / 7, 937: 0.3})
    assert path.read_text().splitlines()[0] == "step,val_loss,train_loss,t62,t937"
    rows = read_csv(path)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[0] == {"step": 10, "val_loss": 0.1 * 10 / 3, "train_loss": 1 / 10, "t62": 10 / 7, "t937": 0.3}
    assert rows[1]["train_loss"] is None
    truncate_csv(path, 20)
    assert [r["step"] for r in read_csv(path)] == [10, 20]
    append_csv(path, 20, 9.0, 9.0, {62: 9.0, 937: 9.0})  # a resumed run's row replaces the killed run's
    assert [(r["step"], r["val_loss"]) for r in read_csv(path)] == [(10, 0.1 * 10 / 3), (20, 9.0)]


def test_csv_refuses_rows_at_other_timesteps(tmp_path):
    path = tmp_path / "validation_loss.csv"
    append_csv(path, 10, 0.5, 0.4, {62: 0.5})
    with pytest.raises(UserError, match="--validation_loss_timesteps"):
        append_csv(path, 20, 0.5, 0.4, {500: 0.5})
    truncate_csv(path, 0)  # only the header left: a fresh run may change the timesteps
    append_csv(path, 20, 0.5, 0.4, {500: 0.5})
    assert list(read_csv(path)[0]) == ["step", "val_loss", "train_loss", "t500"]


def test_loss_curve_is_a_small_png_with_both_lines_and_the_best_step(tmp_path):
    csv_path, png = tmp_path / "validation_loss.csv", tmp_path / "loss.png"
    append_csv(csv_path, 10, 0.5, 0.45, {500: 0.5})
    assert plot_loss_curve(csv_path, png, best_step=10) is None and not png.exists()
    for step, val, train in ((20, 0.3, 0.28), (30, 0.25, 0.2), (40, 0.27, 0.15)):
        append_csv(csv_path, step, val, train, {500: val})
    assert plot_loss_curve(csv_path, png, best_step=30) == png
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (480, 240)
        colors = {c for _, c in image.convert("RGB").getcolors(maxcolors=480 * 240)}
    assert {VAL_COLOR, TRAIN_COLOR, BEST_COLOR, (255, 255, 255)} <= colors


# --- best/ -----------------------------------------------------------------------------------------------


def write_fake_lora(content: str):
    def write(folder):
        (folder / "pytorch_lora_weights.safetensors").write_text(content)

    return write


def test_save_best_replaces_the_whole_folder(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "stale.txt").write_text("from an earlier best")
    assert save_best(tmp_path, 200, 0.125, write_fake_lora("step 200")) == tmp_path / "best"
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [
        "pytorch_lora_weights.safetensors",
        "step.json",
    ]
    assert read_best(tmp_path) == {"step": 200, "val_loss": 0.125}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary folders left


@pytest.mark.parametrize("error", [RuntimeError("crash"), OSError(28, "No space left on device")])
def test_save_best_keeps_the_old_best_when_writing_fails(tmp_path, error):
    save_best(tmp_path, 100, 0.5, write_fake_lora("step 100"))

    def failing(folder):
        (folder / "pytorch_lora_weights.safetensors").write_text("half")
        raise error

    with pytest.raises(UserError if isinstance(error, OSError) else RuntimeError):
        save_best(tmp_path, 200, 0.25, failing)
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_text() == "step 100"
    assert read_best(tmp_path) == {"step": 100, "val_loss": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
