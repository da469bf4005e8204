"""SD 3.5 (and SD 3): an MMDiT transformer trained with flow matching, three text encoders, 16-channel latents.

The transformer (diffusers' SD3Transformer2DModel: SD 3.5 Medium's MMDiT-X dual-attention layers and qk-norm
included) takes the text as a sequence, CLIP-L's and CLIP-G's penultimate hidden states side by side and
zero-padded to T5-XXL's width, then T5's last hidden states, and the two CLIPs' pooled (projected) outputs
as a vector, as the diffusers SD3 script encodes prompts. T5 stays frozen; LoRA can train the two CLIPs.
Latents are (x - shift_factor) * scaling_factor of the 16-channel VAE (sdlora.cache.scale_latents); the
transformer patchifies them 2x2, so image sides are multiples of 16 (VAE factor 8 x patch size 2).
"""

from __future__ import annotations

import re

import torch

from ..errors import UserError
from ..kohya_sd3 import SD3_NAMES
from ..modelfiles import read_model_config
from ..objectives.flow import FLOW_MATCHING
from .base import TEXT_ATTENTION, TEXT_MLP, Family, Geometry, is_layer, token_ids

# The attention projections of the image and context streams (and MMDiT-X's second image attention).
ATTENTION = re.compile(
    r"^transformer_blocks\.\d+\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
)
IN_BLOCKS = re.compile(r"^transformer_blocks\.\d+\.")
T5_MAX_LENGTH = 77  # the diffusers SD3 script's --max_sequence_length default
# kohya key prefixes only SD3 files have: Stability's MMDiT blocks and embedders, and T5's encoder (te3).
_KOHYA_PREFIXES = tuple(
    f"lora_unet_{m}"
    for m in ("joint_blocks_", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer")
) + ("lora_te3_",)


def variant(config: dict | None) -> str | None:
    """kohya's name of an SD3 transformer (sd3_utils.analyze_state_dict_state): "5-medium" (qk-norm and
    MMDiT-X layers), "5-large" (qk-norm), "medium" (SD 3 Medium); None without a config."""
    if config is None:
        return None
    if config.get("qk_norm"):
        return "5-medium" if config.get("dual_attention_layers") else "5-large"
    return "medium"


class SD3Family(Family):
    """SD 3.5 Medium and Large (and SD 3 Medium): StableDiffusion3Pipeline, flow matching, 1024 px."""

    name = "sd3"
    title = "SD 3.5"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # T5-XXL stays frozen (as kohya's default)
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    denoiser = "transformer"
    text_outputs = ("prompt_embeds", "pooled")
    noise_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    vae_fp16_safe = False  # the diffusers SD3 script keeps the VAE in fp32 under fp16
    kohya_names = SD3_NAMES
    version_prefix, architecture_prefix, cross_attention_dim = "5-", "stable-diffusion-3", None

    @property
    def pipeline_kwargs(self) -> dict:
        return {}

    def load_denoiser(self, model: str, **kwargs) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(model, subfolder=self.denoiser, **kwargs)

    def load_tokenizers(self, model: str, revision: str | None = None, t5_max_length: int | None = None):
        """The two CLIP tokenizers (77 tokens) and T5's, padding and truncating to `t5_max_length`."""
        import transformers

        lengths = [{}, {}, {"model_max_length": t5_max_length or T5_MAX_LENGTH}]
        return [
            getattr(transformers, cls).from_pretrained(model, subfolder=sub, revision=revision, **length)
            for sub, cls, length in zip(self.tokenizers, self.tokenizer_classes, lengths)
        ]

    def size_multiple(self, model: str, revision: str | None = None) -> int:
        """VAE factor x patch size: the transformer's patches tile the latents exactly."""
        config = read_model_config(model, f"{self.denoiser}/config.json", revision)
        return self.vae_factor(model, revision) * int(config.get("patch_size", 2))

    def prediction_type(self, scheduler, requested: str | None = None) -> str:
        if requested:
            raise UserError(
                f"--prediction_type {requested}: {self.title} trains with flow matching (a velocity target); "
                "drop --prediction_type (--weighting_scheme and --timestep_shift shape its loss)"
            )
        return FLOW_MATCHING

    # --- conditioning ---------------------------------------------------------------------------------

    def encode_prompts(
        self, tokenizers, text_encoders, prompts: list[str], device
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, 77 + T5 tokens, T5 width), "pooled": (B, CLIP-L + CLIP-G projection widths)}."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
            out = encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True, return_dict=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as the SD3 script and pipeline take
            pooled.append(out.text_embeds)
        t5 = text_encoders[2](token_ids(tokenizers[2], prompts, device), return_dict=False)[0]  # (B, T, W)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, L + G)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zeros up to T5's width
        return {
            "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled": torch.cat(pooled, dim=-1),
        }

    def denoiser_inputs(
        self, text: dict[str, torch.Tensor], geometry: list[Geometry] | None, device, dtype
    ) -> dict:
        return {"encoder_hidden_states": text["prompt_embeds"], "pooled_projections": text["pooled"]}

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The velocity the transformer predicts; timesteps are sigma x 1000, as the scheduler gives them."""
        return model(hidden_states=noisy, timestep=timesteps, **inputs, return_dict=False)[0]

    def lora_scale_kwargs(self, scale: float) -> dict:
        return {"joint_attention_kwargs": {"scale": scale}}

    # --- LoRA -----------------------------------------------------------------------------------------

    def lora_targets(self, denoiser: torch.nn.Module, layers: str) -> list[str]:
        """attn: the attention projections of both streams (diffusers' default, with MMDiT-X's attn2);
        attn_ff: every Linear of the joint blocks (kohya's default: feed-forwards and adaLN modulations too);
        all: also the embedders, the final norm and projection, and the patch embedding's 2x2 conv."""
        chosen = []
        for name, module in denoiser.named_modules():
            if not is_layer(module):
                continue
            if layers == "attn":
                keep = bool(ATTENTION.search(name))
            else:
                keep = layers == "all" or bool(IN_BLOCKS.search(name))
            if keep:
                chosen.append(name)
        return chosen

    def text_lora_targets(self, layers: str) -> list[str]:
        return TEXT_ATTENTION + (TEXT_MLP if layers != "attn" else [])

    def lora_block(self, module: str, denoiser_config) -> tuple[str, int] | None:
        return None  # kohya's block weights number a UNet's blocks

    def block_counts(self, denoiser_config) -> tuple[int, int, int]:
        raise UserError(
            f"--block_dims / --block_alphas number a UNet's down, middle and up blocks; {self.title}'s "
            "transformer has none: use --lora_layers or --lora_target_modules"
        )

    # --- names other tools use ------------------------------------------------------------------------

    def base_model_version(self, prediction_type: str, denoiser_config: dict | None = None) -> str:
        """kohya's ss_base_model_version for SD3: the model type ("5-medium", "5-large", "medium")."""
        return variant(denoiser_config) or "sd3"

    def modelspec_architecture(self, prediction_type: str, denoiser_config: dict | None = None) -> str:
        """kohya's: "stable-diffusion-3-" + the model type ("stable-diffusion-3-5-medium/lora")."""
        kind = variant(denoiser_config)
        return f"stable-diffusion-3-{kind}/lora" if kind else "stable-diffusion-3/lora"

    def kohya_metadata(self, prediction_type: str, denoiser_config: dict | None = None) -> dict[str, str]:
        return {
            "ss_base_model_version": self.base_model_version(prediction_type, denoiser_config),
            "ss_v2": "False",
            "modelspec.architecture": self.modelspec_architecture(prediction_type, denoiser_config),
        }

    # --- recognising it -------------------------------------------------------------------------------

    def matches_model(self, index: dict, denoiser_config: dict) -> bool:
        return index.get("_class_name", "").startswith("StableDiffusion3") or "caption_projection_dim" in (
            denoiser_config
        )

    def matches_header(self, header: dict[str, str]) -> bool:
        version = header.get("ss_base_model_version", "")
        architecture = header.get("modelspec.architecture", "")
        return version in ("medium", "5-medium", "5-large", "sd3") or architecture.startswith(
            ("stable-diffusion-3", "stable-diffusion-v3")
        )

    def matches_kohya_keys(self, keys) -> bool:
        return any(k.startswith(_KOHYA_PREFIXES) for k in keys)


SD3 = SD3Family()
