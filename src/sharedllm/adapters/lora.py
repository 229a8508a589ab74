"""lora: PEFT LoRA (default rank 4, alpha 8) on q, k, v, o and the FFN matrices (gate, up, down)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SharedLLMError
from . import register

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: int = 8
    targets: tuple = TARGETS

    def __post_init__(self):
        if not (isinstance(self.rank, int) and 1 <= self.rank <= 4096):
            raise SharedLLMError(f"LoRA rank must be an integer in 1..4096, got {self.rank!r}")
        if not self.alpha > 0:
            raise SharedLLMError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise SharedLLMError(f"LoRA targets must be module names, got {self.targets!r}")


class LoraMethod:
    name = "lora"

    def __init__(self, config: LoraConfig = LoraConfig()):
        self.config = config

    def attach(self, model):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        c = self.config
        peft_cfg = PeftLoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=list(c.targets),
                                  bias="none")
        return get_peft_model(model, peft_cfg)

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if "lora_" in n}


register(LoraMethod())
