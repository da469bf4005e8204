"""SD 3.5 training-step benchmark: SD 3.5 Medium's architecture (random weights), plain against cached.

    python bench/bench_sd3.py --suite tiny    # seconds: the tiny SD 3.5's shapes, to check the script
    python bench/bench_sd3.py --suite cpu     # SD 3.5 Medium at 512 px in bf16 on a CPU (17 GB; over 25 min a row without AMX)
    python bench/bench_sd3.py --suite gpu     # on a CUDA machine: SD 3.5 Medium at 1024, bf16, batch 1,
                                              # with and without gradient checkpointing, peak VRAM

The models are built from SD 3.5 Medium's configs (MMDiT-X transformer of 24 layers, 1536 wide, dual
attention in layers 0-12; CLIP-L, CLIP-G; T5-XXL's encoder; the 16-channel VAE) with random weights in bf16:
random weights train at the speed of real ones. "plain" loads every part and, each step, VAE-encodes the
pixels and runs the three text encoders (T5 at 77 tokens, the diffusers script's default), then the
transformer's forward and backward and the optimizer step. "cached" is the trainer's default: latents and
text states come from the caches, so the process never holds T5 (9.5 GB in bf16), the CLIPs or the VAE:
a step is the transformer and the optimizer. Both use the trainer's own pieces (the SD 3.5 family's prompt
encoding, denoiser call and layer sets, the flow-matching objective, sdlora.cache.scale_latents, peft
LoRA on the attention layers at rank 16, AdamW on the LoRA weights). Each configuration runs in its own
process, so its peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)  # fmt: skip  (stabilityai/stable-diffusion-3.5-medium's transformer/config.json)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)  # fmt: skip


def build(size: str, plain: bool):
    """(family, tokenizers, text encoders, VAE, transformer) of the size, in bf16 with random weights; the
    text encoders and the VAE only for the plain path."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sdlora.families import SD3
    from sdlora.tiny_model import _tiny_tokenizer
    from sdlora.tiny_sd3 import T5_WIDTH, t5_tokenizer, tiny_sd3_transformer

    tokenizers = [
        _tiny_tokenizer(),
        _tiny_tokenizer(),
        t5_tokenizer(77),
    ]  # (77 + 77 tokens, as real ones pad)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 16 GB of weights on the way
    try:
        if size == "tiny":
            transformer = tiny_sd3_transformer()
            clip_l = clip_g = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   projection_dim=32)  # fmt: skip
            t5 = dict(d_model=T5_WIDTH, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=64,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8)  # fmt: skip
            vae = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
        else:
            transformer = SD3Transformer2DModel(**MEDIUM)
            clip_l, clip_g, t5 = CLIP_L, CLIP_G, T5_XXL
            vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
        encoders, autoencoder = [], None
        if plain:
            tok = tokenizers[0]
            ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, max_position_embeddings=77)  # fmt: skip
            encoders = [
                CLIPTextModelWithProjection(CLIPTextConfig(**ids, **clip_l)),
                CLIPTextModelWithProjection(CLIPTextConfig(**ids, **clip_g)),
                T5EncoderModel(T5Config(**{**t5, "vocab_size": max(t5["vocab_size"], len(tokenizers[2]))})),
            ]
            autoencoder = AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, **vae,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    for module in (*encoders, *([autoencoder] if autoencoder else []), transformer):
        module.requires_grad_(False).eval()
    return SD3, tokenizers, encoders, autoencoder, transformer


def run(cfg: dict) -> dict:
    """One configuration: build, add LoRA, time `steps` optimizer steps after one warm-up step."""
    from peft import LoraConfig

    from sdlora.cache import scale_latents
    from sdlora.objectives.flow import FlowMatchingObjective

    device = torch.device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    started = time.perf_counter()
    family, tokenizers, encoders, vae, transformer = build(cfg["size"], cfg["mode"] == "plain")
    transformer.add_adapter(
        LoraConfig(
            r=16,
            lora_alpha=16,
            init_lora_weights="gaussian",
            target_modules=family.lora_targets(transformer, "attn"),
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 LoRA weights and optimizer state, as the trainer keeps them
    for module in (*encoders, *([vae] if vae else []), transformer):
        module.to(device)
    if cfg["checkpointing"]:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = FlowMatchingObjective(shift=3.0)  # logit-normal, SD 3.5's shift
    build_s = time.perf_counter() - started
    res, batch = cfg["resolution"], cfg["batch"]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, res, res, generator=g).mul(2).sub(1).to(device, torch.bfloat16)
    prompts = ["a photo of a red circle on a blue background, high detail"] * batch
    if cfg["mode"] == "cached":  # what the caches hold: latents (B, 16, H/8, W/8), text states and pooled
        latents = torch.randn(batch, 16, res // 8, res // 8, generator=g).to(device)
        width = 4096 if cfg["size"] != "tiny" else 96
        text = {
            "prompt_embeds": torch.randn(batch, 154, width, generator=g).to(device, torch.bfloat16),
            "pooled": torch.randn(batch, 2048 if cfg["size"] != "tiny" else 64, generator=g).to(
                device, torch.bfloat16
            ),
        }
    times, encode_times = [], []
    for step in range(cfg["steps"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if cfg["mode"] == "plain":
                with torch.no_grad():
                    sample = vae.encode(pixels).latent_dist.sample()
                    latents = scale_latents(
                        sample, vae.config.scaling_factor, vae.config.shift_factor
                    ).float()
                    text = family.encode_prompts(tokenizers, encoders, prompts, device)
                if step:
                    encode_times.append(time.perf_counter() - t0)  # what the caches save each step
            inputs = family.denoiser_inputs(text, None, device, torch.bfloat16)
            loss = objective.training_loss(
                lambda x, t, inputs=inputs: family.denoise(transformer, x.to(torch.bfloat16), t, inputs), latents,
                torch.Generator(device=device).manual_seed(step),
            )  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # (the first step warms up)
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    encode = statistics.median(encode_times) if encode_times else 0.0
    return {
        **cfg,
        "step_s": statistics.median(times),
        "encode_s": encode,
        "build_s": build_s,
        "peak_gb": peak / 1e9,
    }


def suite(name: str) -> list[dict]:
    base = dict(device="cpu", threads=1, batch=1, steps=2, checkpointing=False)
    if name == "tiny":
        return [{**base, "size": "tiny", "resolution": 128, "mode": m} for m in ("plain", "cached")]
    if (
        name == "cpu"
    ):  # (plain without checkpointing would need about 21 GB: over what a 24 GB machine spares)
        cpu = {**base, "size": "medium", "resolution": 512}
        return [
            {**cpu, "mode": "cached", "checkpointing": False},
            {**cpu, "mode": "cached", "checkpointing": True},
            {**cpu, "mode": "plain", "checkpointing": True},
        ]
    if name == "gpu":
        gpu = {**base, "device": "cuda", "size": "medium", "resolution": 1024, "steps": 5}
        return [
            {**gpu, "mode": "cached", "checkpointing": False},
            {**gpu, "mode": "cached", "checkpointing": True},
            {**gpu, "mode": "plain", "checkpointing": True},
        ]
    raise SystemExit(f"unknown suite {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--suite", default="tiny", choices=("tiny", "cpu", "gpu"), help="which configurations to run"
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads per configuration (default: 1)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = p.parse_args()
    if args.run:
        print(json.dumps(run(json.loads(args.run))))
        return
    print(
        "| model | px | mode | checkpointing | step (s) | of which encoding (s) | build (s) | peak memory (GB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg in suite(args.suite):
        cfg["threads"] = args.threads
        out = subprocess.run(
            [sys.executable, __file__, "--run", json.dumps(cfg)], capture_output=True, text=True
        )
        if out.returncode:
            print(
                f"| {cfg['size']} | {cfg['resolution']} | {cfg['mode']} | failed: {out.stderr.strip()[-300:]} |"
            )
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        memory = "VRAM" if r["device"] == "cuda" else "RSS"
        print(
            f"| SD 3.5 {r['size']} | {r['resolution']} | {r['mode']} | {r['checkpointing']} | {r['step_s']:.2f} "
            f"| {r['encode_s']:.2f} | {r['build_s']:.0f} | {r['peak_gb']:.2f} ({memory}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
