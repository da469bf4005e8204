"""The quality levers through the trainer: every optimizer trains and resumes bit for bit; the EMA follows its
recurrence, is what the files hold and resumes exactly; LoRA+ and block weights give each weight its rate;
block dims give each block its rank; the loss, timestep and noise options reach the run and its header."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LATEST, lora_header, lora_weights, read_trace, same_weights, train
from test_train_script import ok

pytestmark = pytest.mark.slow

SHORT = (
    "--max_train_steps",
    "3",
    "--checkpointing_steps",
    "2",
    "--center_crop",
    "--lr_scheduler",
    "constant",
)


def traced(tmp_path, name, model, dataset, *flags, env=None):
    trace = tmp_path / f"trace-{name}"
    trace.mkdir(exist_ok=True)
    result = train(
        model, dataset, tmp_path / name, *flags, env={"SDLORA_TRACE_DIR": str(trace), **(env or {})}
    )
    return result, read_trace(trace).get(0, [])  # no trace: the caller's ok(result) shows the run's error


@pytest.mark.parametrize(
    "optimizer,args,name",
    [
        ("Lion", (), "Lion"),
        ("Lion8bit", (), "Lion8bit"),
        ("Adafactor", (), "Adafactor"),
        (
            "Adafactor",
            ("--optimizer_args", "relative_step=True", "scale_parameter=True", "warmup_init=True"),
            "Adafactor",
        ),
        ("Prodigy", ("--learning_rate", "1.0", "--optimizer_args", "d_coef=2"), "Prodigy"),
        ("AdamWScheduleFree", ("--optimizer_args", "warmup_steps=1"), "AdamWScheduleFree"),
        ("CAME", (), "CAME"),
    ],
)
def test_each_optimizer_trains_and_resumes_bit_for_bit(
    tmp_path, tiny_model, tiny_dataset, optimizer, args, name
):
    flags = (*SHORT, "--optimizer_type", optimizer, *args)
    straight, events = traced(tmp_path, "straight", tiny_model, tiny_dataset, *flags)
    ok(straight)
    setup = next(e for e in events if e["event"] == "setup")
    assert setup["optimizer"] == name
    if optimizer == "Prodigy":
        assert setup["param_groups"][0]["d_coef"] == 2  # --optimizer_args reached it
    stopped, _ = traced(tmp_path, "out", tiny_model, tiny_dataset, *flags, env={"SDLORA_STOP_AT": "step:2"})
    assert stopped.returncode == 2
    ok(train(tiny_model, tiny_dataset, tmp_path / "out", *flags, *LATEST))
    assert same_weights(tmp_path / "out", tmp_path / "straight")
    assert lora_header(tmp_path / "out")["ss_optimizer"].split(".")[-1].startswith(name)
    if optimizer == "AdamWScheduleFree":  # the saved LoRA is its averaged (eval) point; the raw one beside it
        raw = lora_weights(tmp_path / "out", "pytorch_lora_weights_raw.safetensors")
        assert not same_weights_of(raw, lora_weights(tmp_path / "out"))


def same_weights_of(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ema_follows_its_recurrence_is_the_saved_lora_and_resumes_exactly(
    tmp_path, tiny_model, tiny_dataset
):
    flags = (*SHORT, "--checkpointing_steps", "1", "--use_ema", "--ema_decay", "0.5")
    flags += ("--validation_split", "2", "--validation_loss_steps", "1")
    out = tmp_path / "straight"
    ok(train(tiny_model, tiny_dataset, out, *flags))
    raw = [lora_weights(out / f"checkpoint-{s}", "pytorch_lora_weights_raw.safetensors") for s in (1, 2, 3)]
    ema = lora_weights(out)
    for key in (k for k in ema if "lora_B" in k):  # lora_B starts at zero, so the EMA's start is known
        expected = torch.zeros_like(raw[0][key], dtype=torch.float64)
        for n, weights in enumerate(raw):
            d = min(0.5, (1 + n) / (10 + n))  # diffusers' EMAModel warm-up: 0.1, 0.18, 0.25
            expected = d * expected + (1 - d) * weights[key].double()
        assert torch.allclose(ema[key].double(), expected, rtol=1e-5, atol=1e-9), key
    assert not same_weights_of(ema, raw[2])  # the raw weights are kept beside, under another name
    assert same_weights_of(lora_weights(out, "pytorch_lora_weights_raw.safetensors"), raw[2])
    assert lora_header(out)["sdlora_ema"] == "decay 0.5, every 1 steps"
    assert lora_header(out / "best")["sdlora_ema"] == "decay 0.5, every 1 steps"  # best/ holds the EMA too
    resumed = tmp_path / "resumed"
    assert train(tiny_model, tiny_dataset, resumed, *flags, env={"SDLORA_STOP_AT": "step:2"}).returncode == 2
    ok(train(tiny_model, tiny_dataset, resumed, *flags, *LATEST))
    assert same_weights(resumed, out) and same_weights_of(
        lora_weights(resumed, "pytorch_lora_weights_raw.safetensors"), raw[2]
    )
    assert (resumed / "validation_loss.csv").read_text() == (out / "validation_loss.csv").read_text()


def test_loraplus_and_block_weights_give_each_weight_its_rate(tmp_path, tiny_model, tiny_dataset):
    # The tiny UNet has 4 down blocks (IN00-IN03), a middle one and 4 up blocks: zero the down and middle.
    flags = (*SHORT, "--max_train_steps", "2", "--loraplus_lr_ratio", "4", "--train_text_encoder")
    flags += (
        "--down_lr_weight",
        "0",
        "0",
        "0",
        "0",
        "--mid_lr_weight",
        "0",
        "--up_lr_weight",
        "1",
        "1",
        "0.5",
    )
    result, events = traced(tmp_path, "plus", tiny_model, tiny_dataset, *flags)
    ok(result)
    lrs = sorted({g["lr"] for g in next(e for e in events if e["event"] == "setup")["param_groups"]})
    # A at 1e-3, B at 4e-3 (LoRA+), each also halved (OUT02, up_blocks.1.attentions.0) or zeroed (down,
    # middle); OUT03, which the list leaves out, stays at 1 (as kohya fills them).
    assert lrs == [0.0, 5e-4, 1e-3, 2e-3, 4e-3]
    weights = lora_weights(tmp_path / "plus")
    frozen = [k for k in weights if k.startswith(("unet.down_blocks", "unet.mid_block")) and "lora_B" in k]
    assert frozen and all(
        torch.count_nonzero(weights[k]) == 0 for k in frozen
    )  # B starts at 0 and never moved
    moved = [k for k in weights if k.startswith("unet.up_blocks") and "lora_B" in k]
    assert moved and all(torch.count_nonzero(weights[k]) > 0 for k in moved)
    args = json.loads(lora_header(tmp_path / "plus")["ss_network_args"])
    assert (
        args["loraplus_lr_ratio"] == 4.0
        and args["down_lr_weight"] == "0.0,0.0,0.0,0.0"
        and args["mid_lr_weight"] == 0.0
    )


def test_block_dims_give_each_block_its_rank(tmp_path, tiny_model, tiny_dataset):
    from sdlora.lora_files import read_lora

    dims = ("2", "3", "0", "4", "5", "6", "1", "2", "3")  # IN00-IN03, the middle, OUT00-OUT03
    ok(
        train(
            tiny_model,
            tiny_dataset,
            tmp_path / "dims",
            *SHORT,
            "--max_train_steps",
            "1",
            "--block_dims",
            *dims,
        )
    )
    weights = read_lora(tmp_path / "dims")
    ranks = {m: weights.rank("unet", m) for m in weights.modules("unet")}
    # Attention lives in IN01 (down_blocks.0), the middle, and OUT02/OUT03 (up_blocks.1); IN03 has none.
    assert {r for m, r in ranks.items() if m.startswith("down_blocks.0.attentions.0")} == {3}
    assert {r for m, r in ranks.items() if m.startswith("mid_block")} == {5}
    assert {r for m, r in ranks.items() if m.startswith("up_blocks.1.attentions.0")} == {2}
    assert {r for m, r in ranks.items() if m.startswith("up_blocks.1.attentions.1")} == {3}
    bad = train(tiny_model, tiny_dataset, tmp_path / "bad", *SHORT, "--block_dims", "4", "4")
    assert bad.returncode == 2 and "need 9 values for this model: 4 down blocks, 1 middle, 4 up" in bad.stderr


def test_loss_timestep_and_noise_options_reach_the_run_and_its_header(tmp_path, tiny_model, tiny_dataset):
    from test_train_script import scalars_and_images

    first = {}
    runs = {
        "plain": (),
        "huber": ("--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.05"),
        "timesteps": ("--timestep_sampling", "logit_normal", "--min_timestep", "100"),
        "noise": ("--multires_noise_iterations", "4", "--input_perturbation", "0.1"),
    }
    for name, extra in runs.items():
        ok(train(tiny_model, tiny_dataset, tmp_path / name, *SHORT, "--max_train_steps", "1", *extra))
        first[name] = scalars_and_images(tmp_path / name / "logs")[0]["loss"][0]
    assert len(set(first.values())) == 4, first
    header = lora_header(tmp_path / "huber")
    assert (
        header["ss_loss_type"] == "huber"
        and header["ss_huber_c"] == "0.05"
        and header["ss_huber_schedule"] == "constant"
    )
    header = lora_header(tmp_path / "timesteps")
    assert header["ss_timestep_sampling"] == "logit_normal" and header["ss_min_timestep"] == "100"
    header = lora_header(tmp_path / "noise")
    assert header["ss_multires_noise_iterations"] == "4" and header["ss_ip_noise_gamma"] == "0.1"


def test_zero_terminal_snr_trains_samples_and_loads_with_the_rescaled_trailing_schedule(
    tmp_path, tiny_model, tiny_dataset
):
    from sdlora.generation import load_pipeline

    flags = (*SHORT, "--max_train_steps", "1", "--zero_terminal_snr", "--prediction_type", "v_prediction")
    ok(train(tiny_model, tiny_dataset, tmp_path / "zsnr", *flags))
    assert lora_header(tmp_path / "zsnr")["ss_zero_terminal_snr"] == "True"
    pipe, _ = load_pipeline(str(tiny_model), tmp_path / "zsnr")
    config = pipe.scheduler.config
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert config.prediction_type == "v_prediction" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    refused = train(
        tiny_model,
        tiny_dataset,
        tmp_path / "eps",
        *SHORT,
        "--zero_terminal_snr",
        "--prediction_type",
        "epsilon",
    )
    assert refused.returncode == 2 and "--zero_terminal_snr needs v-prediction" in refused.stderr


@pytest.mark.parametrize("kind,package", [("Prodigy", "prodigyopt"), ("CAME", "pytorch-optimizer")])
def test_a_missing_optimizer_package_is_named_before_any_model_loads(monkeypatch, kind, package):
    from sdlora.errors import UserError
    from sdlora.training.optimization import check_optimizer

    monkeypatch.setitem(__import__("sys").modules, package.replace("-", "_"), None)  # `import` now fails
    with pytest.raises(UserError, match=f"--optimizer_type {kind} needs {package}.*pip install {package}"):
        check_optimizer(kind)
