"""full: every parameter of the base trains (the expensive baseline)."""
from __future__ import annotations

from . import register


class FullMethod:
    name = "full"

    def attach(self, model):
        return model

    def trainable(self, model) -> dict:
        return dict(model.named_parameters())


register(FullMethod())
