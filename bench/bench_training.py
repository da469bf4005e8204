"""Training-step benchmark: the trainer's fast path against its own plain path, side by side.

    python bench/bench_training.py --suite tiny          # seconds: the built-in tiny model
    python bench/bench_training.py --suite cpu           # tiny + SD 1.5 architecture at 256 and 512 (about 15 min on 2 cores)
    python bench/bench_training.py --suite buckets       # SD 1.5 at 512 on 4:3 photos: the diffusers example's default against ours
    python bench/bench_training.py --suite sdxl          # the SDXL architecture at 512, plain and cached, and peak memory
    python bench/bench_training.py --suite gpu           # on a CUDA machine: SD 1.5 at 512 and SDXL at 1024, fp16/bf16, 8-bit Adam, checkpointing

Models are built from configs with random weights (no downloads): the built-in tiny model and the full
SD 1.5 architecture (UNet 320/640/1280/1280, cross-attention 768; VAE 128/256/512/512; 12-layer CLIP).
Random weights train at the same speed as real ones.

"plain" is what the diffusers example does on every step: VAE-encode the pixels and run the text
encoder, then the UNet forward and backward and the optimizer step. "cached" is the trainer's default:
latents and text embeddings come from the caches (sdlora.cache), so a step is the UNet and the
optimizer only. Both go through the trainer's own code (sdlora.training's Conditioning, the objective,
make_optimizer, sdlora.lora.add_lora). Each configuration runs in its own process, so its peak memory
(RSS on CPU, torch.cuda.max_memory_allocated on GPU) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _clip(hidden: int, layers: int, heads: int, act: str, projection: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act=act,
        projection_dim=projection,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _sd_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
    )


def build_sd15(seed: int = 0):
    """The Stable Diffusion 1.5 architecture from configs, random weights, as the trainer's BaseModel."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sdlora.families import SD1
    from sdlora.models import BaseModel
    from sdlora.tiny_model import build_tiny_pipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
    vae = _sd_vae(0.18215)
    text_encoder = _clip(768, 12, 12, "quick_gelu", 768)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    tokenizer = (
        build_tiny_pipeline().tokenizer
    )  # token ids only; the tiny vocabulary is a subset of CLIP's size
    return BaseModel("sd15", SD1, [tokenizer], [text_encoder], vae, unet, scheduler)


def build_sdxl(seed: int = 0):
    """The SDXL base architecture from configs (UNet 2.6 B parameters, CLIP ViT-L and OpenCLIP bigG), random weights."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from sdlora.families import SDXL
    from sdlora.models import BaseModel
    from sdlora.tiny_model import build_tiny_pipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        layers_per_block=2,
    )
    vae = _sd_vae(0.13025)
    text_encoder = _clip(768, 12, 12, "quick_gelu", 768)
    text_encoder_2 = _clip(1280, 32, 20, "gelu", 1280, with_projection=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tokenizer = build_tiny_pipeline().tokenizer
    return BaseModel(
        "sdxl", SDXL, [tokenizer, tokenizer], [text_encoder, text_encoder_2], vae, unet, scheduler
    )


def build_tiny():
    from diffusers import DDPMScheduler

    from sdlora.families import SD1
    from sdlora.models import BaseModel
    from sdlora.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel("tiny", SD1, [pipe.tokenizer], [pipe.text_encoder], pipe.vae, pipe.unet, scheduler)


def attention_processors(unet) -> set[str]:
    return {type(p).__name__ for p in unet.attn_processors.values()}


def size_of(resolution) -> tuple[int, int]:
    """(width, height) from 512 or "576x448"."""
    if isinstance(resolution, str) and "x" in resolution:
        w, h = resolution.split("x")
        return int(w), int(h)
    return int(resolution), int(resolution)


def run_one(cfg: dict) -> dict:
    """Build the model, then time cfg['steps'] training steps after a warm-up step that counts FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlora.buckets import Placement
    from sdlora.cache import LatentCache, TensorStore, TextCache, encode_texts
    from sdlora.config.train import OptimizationConfig
    from sdlora.lora import add_lora, lora_parameters
    from sdlora.objectives import DiffusionObjective
    from sdlora.training.accelerator import allow_fast_fp32_math
    from sdlora.training.conditioning import Conditioning
    from sdlora.training.optimization import make_optimizer
    from sdlora.training.step import step_generator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg["precision"]]
    torch.set_num_threads(os.cpu_count() or 1)
    if cfg["tf32"]:
        allow_fast_fp32_math(device)  # the trainer's --allow_tf32
    base = {"sd15": build_sd15, "sdxl": build_sdxl, "tiny": build_tiny}[cfg["model"]]()
    for module in (base.unet, base.vae, *base.text_encoders):
        module.requires_grad_(False)
        module.to(device, dtype)
    torch.manual_seed(0)
    add_lora(base.unet, 4, 4)
    for p in lora_parameters(base.unet):
        p.data = p.data.float()
    if cfg["grad_ckpt"]:
        base.unet.enable_gradient_checkpointing()
    if cfg["channels_last"]:
        base.unet.to(memory_format=torch.channels_last)
    opt = OptimizationConfig(learning_rate=1e-4, use_8bit_adam=cfg["adam8bit"])
    optimizer = make_optimizer([{"params": lora_parameters(base.unet), "lr": 1e-4}], opt, device)
    objective = DiffusionObjective(base.noise_scheduler, base.noise_scheduler.config.prediction_type)
    b, (w, h) = cfg["batch"], size_of(cfg["resolution"])
    # Each image as a 4:3 photo placed in its bucket (or cropped square): what SDXL's time ids are made of.
    images = SimpleNamespace(placements=[Placement((4 * h // 3, h), (4 * h // 3, h), (w, h), (0, 0))] * b)
    pixels = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = [f"a photo of a red circle number {i}" for i in range(b)]
    batch = {
        "index": torch.arange(b),
        "flip": torch.zeros(b, dtype=torch.bool),
        "crop": [(0, 0)] * b,
        "caption": captions,
        "pixel_values": pixels,
    }
    latent_cache = text_cache = None
    t0 = time.perf_counter()
    if cfg["path"] == "cached":  # what the trainer's caches hold, built the same way, in memory
        with torch.no_grad():
            moments = base.vae.encode(pixels.to(device, dtype)).latent_dist.parameters.float().cpu()
        latents = TensorStore(b, ["moments"], None, True)
        latents.fill(lambda idx: [{"moments": moments[i][None]} for i in idx], 0, 1, lambda: None)
        latent_cache = LatentCache(latents, base.vae.config.scaling_factor, None)
        texts = TensorStore(b, list(base.encode_prompts(captions[:1], device)), None, True)
        texts.fill(lambda idx: encode_texts(base, [captions[i] for i in idx], device, 8), 0, 1, lambda: None)
        text_cache = TextCache(texts, captions)
    cache_s = time.perf_counter() - t0
    conditioning = Conditioning(base, images, latent_cache, text_cache, base.text_encoders, device, dtype)
    model = torch.compile(base.unet) if cfg["compile"] else base.unet
    scaler = torch.amp.GradScaler("cuda") if cfg["precision"] == "fp16" else None
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(i: int) -> None:
        gen = step_generator(0, i, 0, 0, device)
        with autocast:
            latents, inputs = conditioning.latents(batch, gen), conditioning.denoiser_inputs(batch)
            denoise = lambda x, t: base.family.denoise(model, x.to(dtype), t, inputs)  # noqa: E731
            loss = objective.training_loss(denoise, latents, gen)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(lora_parameters(base.unet), 1.0)
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step(0)  # warm-up (and compilation, when compiling)
    sync()
    first_s = time.perf_counter() - t0
    counter = FlopCounterMode(display=False)
    with counter:
        step(1)  # FLOPs of one whole step, counted on the same code path
    times = []
    for i in range(cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        step(2 + i)
        sync()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "s_per_step": statistics.median(times),
        "first_step_s": first_s,
        "cache_s": cache_s,
        "flops_per_step": counter.get_total_flops(),
        "peak_bytes": peak,
        "attention": sorted(attention_processors(base.unet)),
    }


def machine_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured peak FLOP/s of a large matrix product in `dtype` (the best of five timings)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best


def config(model, resolution, path, batch=1, precision="fp32", steps=3, **flags) -> dict:
    return {
        "model": model,
        "resolution": resolution,
        "path": path,
        "batch": batch,
        "precision": precision,
        "steps": steps,
        "channels_last": False,
        "compile": False,
        "adam8bit": False,
        "grad_ckpt": False,
        "tf32": False,
        **flags,
    }


def suite(name: str) -> list[dict]:
    tiny = [
        config("tiny", 64, "plain", batch=4, steps=20),
        config("tiny", 64, "cached", batch=4, steps=20),
        config("tiny", 64, "cached", batch=4, steps=20, channels_last=True),
        config("tiny", 64, "cached", batch=4, steps=20, compile=True),
    ]
    if name == "tiny":
        return tiny
    if name == "buckets":
        # The original toolkit's photos are non-square (COCO, 640x480). The diffusers example's default:
        # a 512 random square crop, VAE and text encoder every step. Ours: the 576x448 bucket, cached. And
        # our square cached step at 512 (262,144 px; the bucket has 258,048) for the bucket's own cost.
        return [
            config("sd15", 512, "plain", steps=4, group="photos"),
            config("sd15", "576x448", "cached", steps=4, group="photos"),
            config("sd15", 512, "cached", steps=4, group="photos"),
        ]
    if name == "sdxl":  # SDXL on a CPU: 512 px (1024 takes minutes a step on 2 cores)
        return [config("sdxl", 512, "plain", steps=2), config("sdxl", 512, "cached", steps=2)]
    if name == "cpu":
        rows = list(tiny)
        for res in (256, 512):
            rows += [
                config("sd15", res, "plain"),
                config("sd15", res, "cached"),
                config("sd15", res, "cached", channels_last=True),
            ]
            if res == 256:  # compiling the SD 1.5 UNet takes minutes on 2 cores; once is enough to see it
                rows.append(config("sd15", res, "cached", compile=True))
            rows += [
                config("sd15", res, "plain", tf32=True),
                config("sd15", res, "cached", tf32=True),
                config("sd15", res, "plain", precision="bf16"),
                config("sd15", res, "cached", precision="bf16"),
            ]
        return rows
    if name == "gpu":
        rows = []
        for precision in ("fp16", "bf16"):  # SDXL at 1024: the target is a batch-1 step in 12 GB
            for batch in (1, 4):
                for grad_ckpt in (False, True):
                    rows.append(
                        config(
                            "sdxl",
                            1024,
                            "cached",
                            batch,
                            precision,
                            steps=5,
                            grad_ckpt=grad_ckpt,
                            adam8bit=True,
                        )
                    )
            rows.append(config("sdxl", 1024, "plain", 1, precision, steps=5))
        for precision in ("fp16", "bf16"):
            for batch in (1, 8):
                rows += [
                    config("sd15", 512, "plain", batch, precision, steps=10),
                    config("sd15", 512, "cached", batch, precision, steps=10),
                    config("sd15", 512, "cached", batch, precision, steps=10, channels_last=True),
                    config("sd15", 512, "cached", batch, precision, steps=10, compile=True),
                ]
            rows += [
                config("sd15", 512, "cached", 1, precision, steps=10, adam8bit=True),
                config("sd15", 512, "cached", 1, precision, steps=10, grad_ckpt=True),
                config("sd15", 512, "cached", 1, precision, steps=10, adam8bit=True, grad_ckpt=True),
            ]
        return rows
    raise SystemExit(f"unknown suite {name!r}")


def label(cfg: dict) -> str:
    extras = [k for k in ("channels_last", "compile", "adam8bit", "grad_ckpt", "tf32") if cfg[k]]
    return "+".join([cfg["path"], *extras])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--suite",
        default="tiny",
        choices=["tiny", "cpu", "buckets", "sdxl", "gpu"],
        help="which configurations to run",
    )
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(json.loads(args.run))), flush=True)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = sorted({c["precision"] for c in suite(args.suite)})
    peaks = {p: machine_peak_flops(device, DTYPES[p]) for p in precisions}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    measured = ", ".join(f"{p} {v / 1e12:.2f}" for p, v in peaks.items())
    print(
        f"# {name}; measured matmul peak TFLOP/s: {measured}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| model | res | batch | prec | path | s/step | img/s | vs plain | first step s | peak mem GB | TFLOP/img | % of peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results, plain = [], {}
    for cfg in suite(args.suite):
        env = dict(os.environ)
        if cfg["compile"]:  # a fresh inductor cache, so "first step" is the real (cold) compile time
            env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        proc = subprocess.run(
            [sys.executable, __file__, "--run", json.dumps(cfg)], capture_output=True, text=True, env=env
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(
                f"| {cfg['model']} | {cfg['resolution']} | {cfg['batch']} | {cfg['precision']} | {label(cfg)} | failed: "
                f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:80]} |||||||"
            )
            continue
        r = json.loads(line[len("RESULT ") :])
        # Each row is compared with the plain path at equal precision settings, measured in this same run.
        key = (cfg["model"], cfg.get("group", cfg["resolution"]), cfg["batch"], cfg["precision"], cfg["tf32"])
        if cfg["path"] == "plain" and not any(
            cfg[k] for k in ("channels_last", "compile", "adam8bit", "grad_ckpt")
        ):
            plain[key] = r["s_per_step"]
        ratio = f"{plain[key] / r['s_per_step']:.2f}x" if key in plain else "-"
        achieved = r["flops_per_step"] / r["s_per_step"] / peaks[cfg["precision"]]
        print(
            f"| {cfg['model']} | {cfg['resolution']} | {cfg['batch']} | {cfg['precision']} | {label(cfg)} | "
            f"{r['s_per_step']:.3f} | {cfg['batch'] / r['s_per_step']:.2f} | {ratio} | {r['first_step_s']:.1f} | "
            f"{r['peak_bytes'] / 2**30:.2f} | {r['flops_per_step'] / cfg['batch'] / 1e12:.3g} | {100 * achieved:.0f}% |",
            flush=True,
        )
        results.append({"config": cfg, **r})
    attention = sorted({a for r in results for a in r["attention"]})
    print(f"\nattention processors in use: {', '.join(attention)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "peak_flops": peaks, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
