"""Load SD 3.5 LoRA files with ComfyUI's own code, onto ComfyUI's own SD3 model at the tiny model's shape.

Run with a ComfyUI checkout (and its dependencies) importable, as tests/test_sd3_training.py does when
SDLORA_COMFYUI names one (docs/lora_tools.md says how to set one up):

    python tests/comfyui_sd3.py TRANSFORMER_SAFETENSORS EXPECTED_SAFETENSORS LORA_FILE... > report.json

The transformer (diffusers layout) is turned into Stability's MMDiT names with ComfyUI's own key map
(comfy.utils.mmdit_to_diffusers, the map its LoRA loader uses too), and ComfyUI builds its model from that
state dict (comfy.sd.load_diffusion_model_state_dict). Each LoRA file then goes through what ComfyUI's
LoraLoader node runs (comfy.sd.load_lora_for_models, with the SD3 text encoders' key map), the model is
patched, and the report gives, per file, the keys ComfyUI did not load, the largest difference between its
patched weights and EXPECTED (the transformer with the LoRA fused by diffusers, in the same names).
Text-encoder keys are checked against the key map of ComfyUI's SD3 CLIP-L and CLIP-G, built on the meta
device (their real sizes; no weights are made).
"""

from __future__ import annotations

import json
import logging
import sys
import types

import torch


def _stub_video_packages() -> None:
    """torchvision, torchaudio and av: ComfyUI imports them for models other than SD3; stubs suffice."""
    import importlib.abc
    import importlib.machinery

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Stub(f"{self.__name__}.{name}")

        def __call__(self, *args, **kwargs):
            return None

        def __mro_entries__(self, bases):
            return (object,)

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torchvision", "torchaudio", "av"):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Stub(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def to_stability(diffusers_sd: dict, key_map: dict) -> dict:
    """A diffusers SD3 transformer state dict in Stability's names, by ComfyUI's map (qkv slices joined)."""
    out: dict[str, torch.Tensor] = {}
    for key, target in key_map.items():
        if key not in diffusers_sd:
            continue
        weight = diffusers_sd[key]
        if isinstance(target, str):
            out[target] = weight.clone()
        elif target[1] is not None:  # (name, (dim, offset, size)): a slice of a fused qkv
            name, (dim, offset, size) = target
            if name not in out:
                out[name] = torch.zeros((3 * size, *weight.shape[1:]), dtype=weight.dtype)
            out[name].narrow(dim, offset, size).copy_(weight)
        else:  # (name, None, function): swap_scale_shift
            out[target[0]] = target[2](weight)
    missing = sorted(set(diffusers_sd) - set(key_map))
    if missing:
        raise SystemExit(f"ComfyUI's map has no place for {missing[:3]}")
    return out


def main(transformer_file: str, expected_file: str, lora_files: list[str]) -> dict:
    _stub_video_packages()
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (reads --cpu)
    import comfy.lora
    import comfy.sd
    import comfy.utils
    from comfy.text_encoders.sd3_clip import SD3ClipModel
    from safetensors.torch import load_file

    base = load_file(transformer_file)
    depth = 1 + max(int(k.split(".")[1]) for k in base if k.startswith("transformer_blocks."))
    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth}, output_prefix="")
    model = comfy.sd.load_diffusion_model_state_dict(to_stability(base, key_map))
    expected = to_stability(load_file(expected_file), key_map)
    original = to_stability(base, key_map)
    clip_keys = comfy.lora.model_lora_keys_clip(SD3ClipModel(t5=False, device="meta"), {})
    report = {"model": type(model.model).__name__, "config": str(model.model.model_config.unet_config)}
    for path in lora_files:
        not_loaded: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, sink=not_loaded: sink.append(record.getMessage())
        logging.getLogger().addHandler(handler)
        try:
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
            patches = comfy.lora.load_lora(lora, {**unet_keys, **clip_keys})
            # (a key is a weight's name, or (name, slice) / (name, None, function) for diffusers-format qkv)
            name = {k: k if isinstance(k, str) else k[0] for k in patches}
            patched = model.clone()
            added = patched.add_patches(
                {k: v for k, v in patches.items() if name[k].startswith("diffusion_model.")}, 1.0
            )
            patched.patch_model()
            weights = {
                k.removeprefix("diffusion_model."): v
                for k, v in patched.model.diffusion_model.state_dict(prefix="diffusion_model.").items()
            }
            diff = max((weights[k].float() - expected[k].float()).abs().max().item() for k in expected)
            change = max((weights[k].float() - original[k].float()).abs().max().item() for k in expected)
            patched.unpatch_model()
        finally:
            logging.getLogger().removeHandler(handler)
        text = sorted({name[k] for k in patches if not name[k].startswith("diffusion_model.")})
        report[path] = {
            "not_loaded": [m for m in not_loaded if "lora key not loaded" in m or "NOT LOADED" in m],
            "patched_transformer_weights": len(added),
            "text_encoder_weights": len(text),
            "max_abs_diff": diff,  # from the weights diffusers fused
            "max_abs_change": change,  # from the base weights: what the LoRA did
        }
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
