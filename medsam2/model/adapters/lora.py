"""LoRA on the Hiera attention ``qkv`` linears (and optionally the mask decoder's attention), via peft.

``peft.inject_adapter_in_model`` replaces the matched ``nn.Linear`` with a LoRA layer that keeps the original as
``base_layer``; LoRA's B matrix is zero-initialised, so the model starts identical to the base.
"""

from __future__ import annotations

from torch import nn

from medsam2.model.adapters.base import ADAPTERS
from medsam2.model.adapters.freeze import freeze_image_encoder, set_trainable

TRUNK_QKV = r".*image_encoder\.trunk\.blocks\.\d+\.attn\.qkv"
DECODER_ATTN = r".*sam_mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)"


@ADAPTERS.register("lora")
def lora(model: nn.Module, cfg) -> None:
    """Trunk frozen, LoRA(rank=cfg.adapter_rank, alpha=2·rank) on every trunk qkv; prompt encoder + decoder train.

    With ``cfg.lora_decoder`` the decoder's transformer attention also gets LoRA and its base weights freeze.
    """
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft pulls in transformers (~10 s import)

    pattern = TRUNK_QKV if not cfg.lora_decoder else f"({TRUNK_QKV})|({DECODER_ATTN})"
    config = LoraConfig(r=cfg.adapter_rank, lora_alpha=2 * cfg.adapter_rank, target_modules=pattern, lora_dropout=0.0)
    inject_adapter_in_model(config, model.sam)
    freeze_image_encoder(model)
    if cfg.lora_decoder:
        set_trainable(model.sam.sam_mask_decoder.transformer, False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
