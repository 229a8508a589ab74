"""lora: PEFT LoRA (default rank 4, alpha 8) on q, k, v, o and the FFN matrices (gate, up, down).

Per row (`LoraRows`, Punica / S-LoRA style): the base matmul is shared by every row; after each targeted linear,
the rows that have a LoRA add their own low-rank change, y[b] += (x[b] @ A_b^T) @ (s B_b^T) with s = alpha / rank,
as two gathered batched matmuls over those rows (one pair per rank present), never a loop over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SharedLLMError
from . import Capabilities, register

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


MAX_SERVED_RANK = 16  # the largest rank the per-row kernel takes (it bounds the server's default upload size)


@dataclass(frozen=True, eq=False)
class LoraState:
    """One user's LoRA as the kernel runs it: per site (A^T [K, r], s B^T [r, N])."""

    sites: dict


class LoraRows:
    """The LoRA kernel: per linear site, the rows with a LoRA there, their A^T and s B^T stacked per rank."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device

    def max_numbers(self) -> int:
        """The most numbers a LoRA this kernel takes can hold: every decoder linear at MAX_SERVED_RANK."""
        return MAX_SERVED_RANK * sum(i + o for i, o in self.shapes.values())

    def pack(self, named: dict, config: LoraConfig) -> LoraState:
        if config.rank > MAX_SERVED_RANK:
            raise SharedLLMError(f"LoRA rank {config.rank} is over the largest served rank {MAX_SERVED_RANK}")
        scale = config.alpha / config.rank
        sites = {}
        for name, a in named.items():
            site, _, kind = name.partition(".lora_")
            if kind != "A.default.weight":
                continue
            b = named.get(f"{site}.lora_B.default.weight")
            if site not in self.shapes or b is None:
                raise SharedLLMError(f"LoRA tensor {name[:60]!r}: not a decoder linear this base runs per row")
            sites[site] = (a.float().t().to(self.device), (b.float() * scale).t().to(self.device))
        if 2 * len(sites) != len(named):
            raise SharedLLMError("LoRA adapter: every lora_A needs its lora_B (and nothing else)")
        return LoraState(sites)

    def batch(self, states: list) -> dict:
        """site -> [(rows, A [b', K, r], B [b', r, N], all rows in order?)], one entry per rank present."""
        groups: dict = {}
        for b, st in enumerate(states):
            for site, (a, bb) in (st.sites.items() if st is not None else ()):
                groups.setdefault((site, a.shape[1]), []).append((b, a, bb))
        view: dict = {}
        for (site, _), members in groups.items():
            rows = [m[0] for m in members]
            everyone = rows == list(range(len(states)))
            idx = torch.tensor(rows, device=self.device)
            view.setdefault(site, []).append((idx, torch.stack([m[1] for m in members]),
                                              torch.stack([m[2] for m in members]), everyone))
        return view

    def gain(self, view, index: int):
        return None

    def touches(self, view: dict, site: str) -> bool:
        return site in view

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, a, b, everyone in view.get(site, ()):
            xs = x if everyone else x.index_select(0, rows)
            flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # [b', T, K] (T = 1 in a decode step)
            delta = torch.bmm(torch.bmm(flat.to(a.dtype), a), b).reshape(*xs.shape[:-1], b.shape[-1])
            y = y + delta.to(y.dtype) if everyone else y.index_add(0, rows, delta.to(y.dtype))
        return y


class LoraMethod:
    name = "lora"
    caps = Capabilities(rows=LoraRows, export="peft")

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
