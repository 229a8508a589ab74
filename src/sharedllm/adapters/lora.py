"""lora: PEFT LoRA (default rank 4, alpha 8) on q, k, v, o and the FFN matrices (gate, up, down).

Per row (`LoraRows`, Punica / S-LoRA style): the base matmul is shared by every row; after each targeted linear,
the rows that have a LoRA add their own low-rank change, y[b] += (x[b] @ A_b^T) @ (s B_b^T) with s = alpha / rank,
as two gathered batched matmuls over those rows (one pair per rank present), never a loop over rows.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from ..compat import quiet_peft_checkpointing_probe
from ..errors import SharedLLMError
from . import Capabilities, register
from .kernel import LinearRows, row_groups

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
A_KEY, B_KEY = ".lora_A.default.weight", ".lora_B.default.weight"  # PEFT's tensor names of a site's A and B


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


SPARE_BUFFERS = 2  # gather buffers kept for reuse per kernel


class _View(dict):
    """A batch's LoRA view (site -> groups); a class so that its gather buffer can go back when it is garbage."""


MAX_SERVED_RANK = 16  # the largest rank the per-row kernel takes (it bounds the server's default upload size)


@dataclass(frozen=True, eq=False)
class LoraState:
    """One user's LoRA as the kernel runs it: every site's A^T [K, r] and s B^T [r, N] in one flat fp32 vector
    (`sites`: site -> offsets and shapes; `layout`: what rows must share to be gathered together)."""

    flat: torch.Tensor
    sites: dict
    layout: tuple


class LoraRows(LinearRows):
    """The LoRA kernel: the LoRA rows' flat vectors gathered once per batch composition (one copy per layout),
    every site's A^T and s B^T a view into that [rows, P] tensor."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device
        self._spare: list = []  # gather buffers of batches that are gone, reused (a fresh one costs page faults)
        self._lock = threading.Lock()

    def max_numbers(self) -> int:
        """The most numbers a LoRA this kernel takes can hold: every decoder linear at MAX_SERVED_RANK."""
        return MAX_SERVED_RANK * sum(i + o for i, o in self.shapes.values())

    def pack(self, named: dict, config: LoraConfig) -> LoraState:
        if config.rank > MAX_SERVED_RANK:
            raise SharedLLMError(f"LoRA rank {config.rank} is over the largest served rank {MAX_SERVED_RANK}")
        scale = config.alpha / config.rank
        parts, sites, at = [], {}, 0
        for name, a in named.items():
            site, _, kind = name.partition(".lora_")
            if kind != "A.default.weight":
                continue
            b = named.get(site + B_KEY)
            if site not in self.shapes or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise SharedLLMError(f"LoRA tensor {name[:60]!r}: not a decoder linear this base runs per row")
            (r, k), n = a.shape, b.shape[0]
            sites[site] = (at, k, r, at + k * r, n)
            parts += [a.float().t().reshape(-1), (b.float() * scale).t().reshape(-1)]
            at += k * r + r * n
        if 2 * len(sites) != len(named):
            raise SharedLLMError("LoRA adapter: every lora_A needs its lora_B (and nothing else)")
        flat = torch.cat(parts).to(self.device)
        return LoraState(flat, sites, tuple((s, v[1:3], v[4]) for s, v in sites.items()))

    def batch(self, states: list) -> dict:
        """site -> [(rows, A [b', K, r], B [b', r, N], all rows in order?)], one entry per layout present."""
        view = _View()
        for _, idx, members, everyone in row_groups(states, lambda st: st.layout, self.device):
            flats = self._gather([st.flat for st in members], view)  # the one copy of this batch composition
            for site, (oa, k, r, ob, n) in members[0].sites.items():
                a = flats[:, oa: oa + k * r].view(len(members), k, r)
                b = flats[:, ob: ob + r * n].view(len(members), r, n)
                view.setdefault(site, []).append((idx, a, b, everyone))
        return view

    def _gather(self, flats: list, owner) -> torch.Tensor:
        """torch.stack(flats) into a spare buffer when one fits (returned when `owner` is garbage); where autograd
        may record (fleet training, or a batch built outside inference / no-grad mode), a plain stack."""
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return torch.stack(flats)
        rows, n = len(flats), flats[0].numel()
        with self._lock:
            fit = next((i for i, t in enumerate(self._spare) if t.shape[0] >= rows and t.shape[1] == n), None)
            buf = self._spare.pop(fit) if fit is not None else None
        if buf is None:
            buf = flats[0].new_empty(1 << (rows - 1).bit_length(), n)  # rows rounded up to a power of two
        weakref.finalize(owner, self._give_back, buf)
        return torch.stack(flats, out=buf[:rows])

    def _give_back(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._spare = ([buf] + self._spare)[:SPARE_BUFFERS]

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, a, b, everyone in view.get(site, ()):
            xs = x if everyone else x.index_select(0, rows)
            flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # [b', T, K] (T = 1 in a decode step)
            delta = torch.bmm(torch.bmm(flat.to(a.dtype), a), b).reshape(*xs.shape[:-1], b.shape[-1])
            y = y + delta.to(y.dtype) if everyone else y.index_add(0, rows, delta.to(y.dtype))
        return y


class LoraMethod:
    name = "lora"
    caps = Capabilities(rows=LoraRows, export="peft", low_rank=True)

    def __init__(self, config: LoraConfig = LoraConfig()):
        self.config = config

    def attach(self, model):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        c = self.config
        peft_cfg = PeftLoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=0.0, target_modules=list(c.targets),
                                  bias="none")
        with quiet_peft_checkpointing_probe():
            return get_peft_model(model, peft_cfg)

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if "lora_" in n}


register(LoraMethod())
