"""ia3: (IA)^3 (Liu et al. 2022, via PEFT): one learned vector per targeted linear scales that linear's output.

The default targets are the paper's: keys, values and the FFN intermediate (scaling up_proj's output is scaling
the intermediate silu(gate) * up, since the product is element-wise); `--ia3-targets` takes any of the seven
projections ("all linears"). Every target is output-scaled (PEFT's `feedforward_modules` left empty), so a row's
change is one element-wise multiply after the shared matmul (`IA3Rows`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import quiet_peft_checkpointing_probe
from ..errors import SharedLLMError
from . import Capabilities, register
from .kernel import LinearRows

TARGETS = ("k_proj", "v_proj", "up_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
SUFFIX = ".ia3_l.default"


@dataclass(frozen=True)
class IA3Config:
    targets: tuple = TARGETS

    def __post_init__(self):
        if not self.targets or not all(isinstance(t, str) and t in ALL for t in self.targets):
            raise SharedLLMError(f"(IA)^3 targets must be among {', '.join(ALL)}, got {self.targets!r}")


class IA3Rows(LinearRows):
    """The (IA)^3 kernel: per linear site, the rows that scale it and their vectors [b', N], stacked per batch."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device

    def max_numbers(self) -> int:
        return sum(o for _, o in self.shapes.values())

    def pack(self, named: dict, config: IA3Config) -> dict:
        out = {}
        for name, v in named.items():
            site = name.removesuffix(SUFFIX)
            if site == name or site not in self.shapes or v.numel() != self.shapes[site][1]:
                raise SharedLLMError(f"(IA)^3 tensor {name[:60]!r}: not a decoder linear this base runs per row")
            out[site] = v.float().reshape(-1).to(self.device)
        return out

    def batch(self, states: list) -> dict:
        """site -> (rows, vectors [b', N], all rows in order?)."""
        per_site: dict = {}
        for b, st in enumerate(states):
            for site, v in (st or {}).items():
                per_site.setdefault(site, []).append((b, v))
        view = {}
        for site, members in per_site.items():
            rows = [b for b, _ in members]
            view[site] = (torch.tensor(rows, device=self.device), torch.stack([v for _, v in members]),
                          rows == list(range(len(states))))
        return view

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if site not in view:
            return y
        rows, v, everyone = view[site]
        v = v.view(v.shape[0], *([1] * (y.dim() - 2)), v.shape[-1]).to(y.dtype)
        return y * v if everyone else y.index_copy(0, rows, y.index_select(0, rows) * v)


class IA3Method:
    name = "ia3"
    caps = Capabilities(rows=IA3Rows, export="peft")

    def __init__(self, config: IA3Config = IA3Config()):
        self.config = config

    def attach(self, model):
        from peft import IA3Config as PeftIA3Config
        from peft import get_peft_model

        with quiet_peft_checkpointing_probe():
            return get_peft_model(model, PeftIA3Config(target_modules=list(self.config.targets), feedforward_modules=[]))

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".ia3_l." in n}


register(IA3Method())
