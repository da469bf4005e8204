"""SD 2.x: OpenCLIP's text encoder (1024 wide), linear transformer projections, epsilon (512) or v-prediction (768)."""

from __future__ import annotations

from .base import Family


class SD2Family(Family):
    name = "sd2"
    title = "SD 2.x"
    version_prefix, architecture_prefix, cross_attention_dim = "sd_v2", "stable-diffusion-v2", 1024

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        if prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v/lora"
        return "stable-diffusion-v2-512/lora"

    def kohya_metadata(self, prediction_type: str, denoiser_config: dict | None = None) -> dict[str, str]:
        return {**super().kohya_metadata(prediction_type), "ss_v2": "True"}

    def matches_model(self, index: dict, denoiser_config: dict) -> bool:
        # Linear transformer projections or 1024-wide cross-attention, as OpenCLIP's text encoder gives.
        return (
            bool(denoiser_config.get("use_linear_projection"))
            or denoiser_config.get("cross_attention_dim") == 1024
        )


SD2 = SD2Family()
