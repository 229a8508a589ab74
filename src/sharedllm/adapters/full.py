"""full: every parameter of the base trains (the expensive baseline)."""
from __future__ import annotations

from . import NoConfig, register


class FullMethod:
    name = "full"

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def attach(self, model):
        return model

    def trainable(self, model) -> dict:
        return dict(model.named_parameters())


register(FullMethod())
