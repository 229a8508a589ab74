"""The model computation for mixed-user batches: every RMSNorm scales row b by that row's own gain vector.

`RowGainModel` shares every weight tensor with the frozen base (nothing is copied) but replaces each RMSNorm
with `RowGainRMSNorm`, which reads the gains for the current forward pass from a context variable set by
`RowGainModel.forward(..., gains=...)`. The gains are an argument of each call (a context variable is local to
the calling thread), so there is no "active adapter" that one request could change under another.

    out = hidden * rsqrt(mean(hidden^2) + eps) * (gain[row] + offset)     (offset 1 for Gemma's (1 + w))
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from ..adapters import shared_copy
from ..arch import Base, gain_offset, norm_modules

_ROW_GAINS: contextvars.ContextVar = contextvars.ContextVar("sharedllm_row_gains", default=None)


class RowGainRMSNorm(torch.nn.Module):
    """An RMSNorm without its own weight: the gain of norm `index` for each row comes from the running call."""

    def __init__(self, index: int, eps: float, offset: float, name: str):
        super().__init__()
        self.index, self.eps, self.offset, self.name = index, eps, offset, name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = _ROW_GAINS.get()
        if rows is None:
            raise RuntimeError("RowGainRMSNorm called outside RowGainModel.forward (no per-row gains given)")
        gain = rows[self.index]  # [B, D]
        gain = gain.view(gain.shape[0], *([1] * (hidden.dim() - 2)), gain.shape[-1])
        dtype = hidden.dtype
        h = hidden.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)).to(dtype)
            return (h * (self.offset + gain.float())).to(dtype)
        return gain * h.to(dtype)  # Llama, Qwen2, Mistral: w * x.to(dtype)


@dataclass(frozen=True)
class Gains:
    """One user's gain vectors, in the order of `RowGainModel.names` (fp32, on the model's device)."""

    vectors: tuple
    sha256: str = ""

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors)


class RowGainModel:
    """The base model, callable on a batch whose rows each carry their own norm gains."""

    def __init__(self, base: Base):
        self.base = base
        self.model = shared_copy(base.model)
        norms = norm_modules(self.model)
        self.names = [f"{n}.weight" for n in norms]  # the norm adapter's canonical tensor names, in order
        self.shapes = [tuple(m.weight.shape) for m in norms.values()]
        for i, (name, mod) in enumerate(norms.items()):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
            _replace(self.model, name, RowGainRMSNorm(i, eps, gain_offset(mod), name))
        self.base_gains = Gains(tuple(m.weight.detach().float() for m in norms.values()), "base")
        self.device = base.device

    def gains_from(self, named: dict[str, torch.Tensor], sha256: str = "") -> Gains:
        """Named adapter tensors (as decoded from a file) -> Gains in this model's order."""
        return Gains(tuple(named[n].detach().float().to(self.device) for n in self.names), sha256)

    def stack(self, rows: list[Gains]) -> list[torch.Tensor]:
        return [torch.stack([g.vectors[i] for g in rows]) for i in range(len(self.names))]

    @contextlib.contextmanager
    def rows(self, stacked: list[torch.Tensor]):
        """Run the model inside this block with per-row gains `stacked` (one [B, D] tensor per norm).

        Serving calls it under inference mode; training (sharedllm.fleet) calls it with gains that require grad,
        so the backward pass reaches each user's own gain vectors."""
        token = _ROW_GAINS.set(stacked)
        try:
            yield self.model
        finally:
            _ROW_GAINS.reset(token)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, gains: list[Gains] | list[torch.Tensor], **kwargs):
        """One forward pass; `gains` is one Gains per row (or already stacked per norm)."""
        stacked = self.stack(gains) if gains and isinstance(gains[0], Gains) else gains
        with self.rows(stacked) as model:
            return model(input_ids=input_ids, **kwargs)


def _replace(model: torch.nn.Module, qualified: str, new: torch.nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
