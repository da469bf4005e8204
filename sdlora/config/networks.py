"""The checks on the adapter's network type (LoRA, LoHa, LoKr): what peft's LoHa and LoKr cannot do."""

from __future__ import annotations


def network_errors(cfg) -> list[str]:
    """What cannot work with --network_type (cfg: config.train.TrainConfig), each as the message the user sees."""
    adapter, opt = cfg.adapter, cfg.optimizer
    network = adapter.network_type
    lycoris = network in ("loha", "lokr")
    errors = []
    if lycoris and adapter.use_dora:
        errors.append(
            f"--use_dora is for LoRA: peft has no DoRA for {network}; drop it or use --network_type lora"
        )
    if lycoris and adapter.lora_dropout:
        errors.append(
            f"--lora_dropout: peft's (and LyCORIS's) {network} has no input dropout; use --rank_dropout or "
            "--module_dropout"
        )
    if lycoris and any(
        r is not None
        for r in (opt.loraplus_lr_ratio, opt.loraplus_unet_lr_ratio, opt.loraplus_text_encoder_lr_ratio)
    ):
        errors.append(
            f"LoRA+ (--loraplus_*lr_ratio) speeds up LoRA's lora_B, which {network} has not; drop it"
        )
    if not lycoris and (adapter.rank_dropout or adapter.module_dropout or adapter.use_tucker):
        errors.append(
            "--rank_dropout, --module_dropout and --use_tucker are LoHa/LoKr's: pass --network_type loha or lokr "
            "(LoRA's dropout is --lora_dropout)"
        )
    if network != "lokr" and (adapter.lokr_factor != -1 or adapter.decompose_both):
        errors.append("--lokr_factor and --decompose_both are LoKr's: pass --network_type lokr")
    if adapter.lokr_factor == 0 or adapter.lokr_factor < -1:
        errors.append(f"--lokr_factor {adapter.lokr_factor}: use -1 (automatic) or a size of at least 1")
    if not (0 <= adapter.rank_dropout < 1 and 0 <= adapter.module_dropout < 1):
        errors.append("--rank_dropout and --module_dropout must be in [0, 1)")
    if network == "lokr" and adapter.use_tucker:
        # ComfyUI 0.8.0's lokr.py feeds the Tucker core's einsum straight to torch.kron, which fails on its
        # strides (measured with torch 2.13): ComfyUI logs an error and skips the module. LyCORIS and A1111 make it contiguous.
        errors.append(
            "--use_tucker with lokr: ComfyUI cannot apply a LoKr's Tucker convs (it skips them); use loha"
        )
    if adapter.use_tucker and adapter.lora_layers != "all" and not adapter.lora_target_modules:
        errors.append("--use_tucker decomposes the 3x3 convs, which only --lora_layers all adapts")
    return errors
