"""steer: one learned vector added to the residual stream after the last block (Bet 58's steering vector)."""
from __future__ import annotations

import torch

from ..arch import norm_modules
from . import Capabilities, NoConfig, register

PARAM = "sharedllm_steer"


def final_norm(model) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "norm"):
        return inner.norm
    return list(norm_modules(model).values())[-1]


class SteerMethod:
    name = "steer"
    caps = Capabilities()

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def attach(self, model):
        hidden = model.config.hidden_size
        model.register_parameter(PARAM, torch.nn.Parameter(torch.zeros(hidden)))
        final_norm(model).register_forward_pre_hook(lambda _m, args: (args[0] + getattr(model, PARAM),) + args[1:])
        return model

    def trainable(self, model) -> dict:
        return {PARAM: getattr(model, PARAM)}


register(SteerMethod())
