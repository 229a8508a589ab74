"""norm: train every RMSNorm gain vector and nothing else (BitFit-style).

Per row: each RMSNorm scales row b by that row's own gain vector (`NormRows`); rows of other methods and the bare
base get the base's own gains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import norm_modules
from ..errors import SharedLLMError
from . import Capabilities, NoConfig, register


@dataclass(frozen=True, eq=False)
class Gains:
    """One user's gain vectors, in the order of `RowModel.norm_names` (fp32, on the model's device)."""

    vectors: tuple


class NormRows:
    """The norm kernel: a [B, D] gain per RMSNorm per call, stacked once per batch composition."""

    def __init__(self, rm):
        self.names, self.base, self.device = rm.norm_names, rm.base_gains, rm.device

    def max_numbers(self) -> int:
        return sum(g.numel() for g in self.base)

    def pack(self, named: dict, config) -> Gains:
        missing = [n for n in self.names if n not in named]
        if missing or len(named) != len(self.names):
            raise SharedLLMError(f"norm adapter: tensor names do not match this base's norms ({missing[:2]})")
        return Gains(tuple(named[n].float().to(self.device) for n in self.names))

    def batch(self, states: list) -> list[torch.Tensor]:
        return [torch.stack([self.base[i] if g is None else g.vectors[i] for g in states])
                for i in range(len(self.names))]

    def gain(self, view: list, index: int) -> torch.Tensor:
        return view[index]

    def touches(self, view, site: str) -> bool:
        return False

    def linear(self, view, site, x, y):
        return y


class NormMethod:
    name = "norm"
    caps = Capabilities(rows=NormRows, export="merged", gguf=True, frozen_bf16=True)

    def __init__(self, config: NoConfig = NoConfig()):
        self.config = config

    def attach(self, model):
        return model

    def trainable(self, model) -> dict:
        return {f"{n}.weight": m.weight for n, m in norm_modules(model).items()}


register(NormMethod())
