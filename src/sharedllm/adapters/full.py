"""full: every parameter of the base trains (the expensive baseline)."""
from __future__ import annotations

from . import Capabilities, NoConfig, register


class FullMethod:
    name = "full"
    caps = Capabilities(export="merged", max_value=65504.0, periodic_snapshot=False)

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def attach(self, model):
        return model

    def trainable(self, model) -> dict:
        return dict(model.named_parameters())


register(FullMethod())
