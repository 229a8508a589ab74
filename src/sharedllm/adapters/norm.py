"""norm: train every RMSNorm gain vector and nothing else (BitFit-style; the production adapter)."""
from __future__ import annotations

from ..base import norm_modules
from . import register


class NormMethod:
    name = "norm"

    def attach(self, model):
        return model

    def private(self, model) -> list:
        """The gains are trained in place: the adapted copy gets its own; every other tensor is shared."""
        return [m.weight for m in norm_modules(model).values()]

    def trainable(self, model) -> dict:
        return {f"{n}.weight": m.weight for n, m in norm_modules(model).items()}


register(NormMethod())
