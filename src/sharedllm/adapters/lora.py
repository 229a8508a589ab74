"""lora: PEFT LoRA rank 4 on q, k, v, o and the FFN matrices (gate, up, down)."""
from __future__ import annotations

from . import register

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


class LoraMethod:
    name = "lora"
    rank = 4
    alpha = 8

    def attach(self, model):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
        return get_peft_model(model, cfg)

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if "lora_" in n}


register(LoraMethod())
