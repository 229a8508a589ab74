"""norm: train every RMSNorm gain vector and nothing else (BitFit-style; the production adapter)."""
from __future__ import annotations

from ..arch import norm_modules
from . import NoConfig, register


class NormMethod:
    name = "norm"

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def attach(self, model):
        return model

    def trainable(self, model) -> dict:
        return {f"{n}.weight": m.weight for n, m in norm_modules(model).items()}


register(NormMethod())
