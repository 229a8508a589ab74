"""loraxs: LoRA-XS (Balazy et al. 2024): per targeted linear, a frozen truncated SVD of the base's own weight gives
the shared bases, and each user trains one r x r matrix R between them.

For a targeted linear W [N, K] with truncated SVD W ~ U_r S_r V_r^T (the r largest singular values):

    W' = W + (U_r S_r) R V_r^T        i.e. delta y = (U_r S_r) (R (V_r^T x))

the paper's parametrisation (its A = U_r S_r, B = V_r^T, fixed; R trainable), with no extra scaling factor, and one
deviation: R starts at ZERO (the paper draws it from a small Gaussian) so that a fresh adapter is the base exactly;
with A and B fixed and non-zero the gradient of R is not zero there (A^T G B^T), so training moves it at once.

The bases are a function of the base's weights alone: computed once per weight tensor (cached for the process, in
float64 on the CPU, each singular pair's sign fixed so that U's largest-|.| entry is positive: the same bases on
every machine whatever LAPACK returns), shared by every user of the base and never saved per user; the user's file
holds only R per targeted linear. Default r = 16 on all seven projections: r^2 = 256 numbers per linear, 53,760 per
user at the default base (SmolLM2-135M, 30 layers; 105 KB in fp16), 43,008 at Qwen2.5-0.5B (24 layers; 84 KB).

Attach (training alone) wraps each targeted linear in `XSLinear`; per row (`LoraXSRows`), each targeted linear
runs x V_r (shared by the LoRA-XS rows of one rank), one gathered bmm with every row's own R^T, then (U_r S_r)^T
(shared), never a loop over rows. Not a PEFT method (PEFT 0.21 has no LoRA-XS), so no export.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SharedLLMError
from . import Capabilities, register
from .kernel import LinearRows, row_groups

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARAM = "loraxs_R"
MAX_SERVED_RANK = 64  # the largest r the per-row kernel takes (it bounds the server's default upload size)


@dataclass(frozen=True)
class LoraXSConfig:
    rank: int = 16
    targets: tuple = ALL

    def __post_init__(self):
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and 1 <= self.rank <= MAX_SERVED_RANK):
            raise SharedLLMError(f"LoRA-XS rank must be an integer in 1..{MAX_SERVED_RANK}, got {self.rank!r}")
        if not self.targets or not all(isinstance(t, str) and t in ALL for t in self.targets):
            raise SharedLLMError(f"LoRA-XS targets must be among {', '.join(ALL)}, got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise SharedLLMError(f"LoRA-XS targets must not repeat, got {self.targets!r}")


_CACHE: dict = {}  # (id(weight), weight._version, rank) -> (U_r S_r [N, r], V_r^T [r, K]) fp32 on the CPU
_CACHE_LOCK = threading.Lock()


def _forget(key_id: int) -> None:
    with _CACHE_LOCK:
        for k in [k for k in _CACHE if k[0] == key_id]:
            del _CACHE[k]


@torch.no_grad()
def svd_bases(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r [N, r], V_r^T [r, K]) of `weight` [N, K] in fp32 on the CPU: float64 SVD, signs fixed (each U
    column's largest-|.| entry positive); cached per weight tensor until it changes or is freed."""
    n, k = weight.shape
    if rank > min(n, k):
        raise SharedLLMError(f"LoRA-XS rank {rank} is over this base's linear of shape [{n}, {k}] (at most {min(n, k)})")
    key = (id(weight), weight._version, rank)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))[0]
    sign[sign == 0] = 1.0
    out = ((u * (s * sign)).float().contiguous(), (vh * sign[:, None]).float().contiguous())
    with _CACHE_LOCK:
        fresh = not any(c[0] == key[0] for c in _CACHE)
        _CACHE[key] = out
    if fresh:
        weakref.finalize(weight, _forget, key[0])
    return out


def targeted(model: torch.nn.Module, targets: tuple) -> dict:
    """site -> module: the decoder linears `targets` names (by their last name component), as RowModel names them."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}" and name.rpartition(".")[2] in targets}


class XSLinear(torch.nn.Module):
    """A frozen linear plus its LoRA-XS change: y = W x (+ bias) + (U_r S_r) (R (V_r^T x)); R is the only parameter."""

    def __init__(self, inner: torch.nn.Linear, rank: int):
        super().__init__()
        self.base_layer = inner
        us, vt = svd_bases(inner.weight, rank)
        self.register_buffer("loraxs_us", us.to(inner.weight.device), persistent=False)
        self.register_buffer("loraxs_vt", vt.to(inner.weight.device), persistent=False)
        self.loraxs_R = torch.nn.Parameter(torch.zeros(rank, rank, device=inner.weight.device))

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        delta = F.linear(F.linear(F.linear(x.to(self.loraxs_R.dtype), self.loraxs_vt), self.loraxs_R), self.loraxs_us)
        return y + delta.to(y.dtype)


@dataclass(frozen=True, eq=False)
class XSState:
    """One user's LoRA-XS as the kernel runs it: site -> R [r, r] fp32 on the device; `rank` r."""

    sites: dict
    rank: int


class LoraXSRows(LinearRows):
    """The LoRA-XS kernel: per batch, the LoRA-XS rows grouped by rank; per targeted site, their R^T stacked once
    [b', r, r]; V_r^T and U_r S_r shared by the group (the base's own SVD, computed once per site and rank)."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device
        self.weights = {site: rm.model.get_submodule(site).weight for site in self.shapes}
        self._bases: dict = {}  # (site, rank) -> (U_r S_r, V_r^T) on the device
        self._lock = threading.Lock()

    def max_numbers(self) -> int:
        return MAX_SERVED_RANK ** 2 * len(self.shapes)

    def _basis(self, site: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            hit = self._bases.get((site, rank))
        if hit is None:
            hit = tuple(t.to(self.device) for t in svd_bases(self.weights[site], rank))
            with self._lock:
                self._bases[(site, rank)] = hit
        return hit

    def pack(self, named: dict, config: LoraXSConfig) -> XSState:
        sites = [s for s in self.shapes if s.rpartition(".")[2] in config.targets]
        if not sites:
            raise SharedLLMError(f"LoRA-XS adapter: this base has no decoder linear named {', '.join(config.targets)}")
        r, out = config.rank, {}
        for site in sites:
            t = named.get(f"{site}.{PARAM}")
            if t is None or tuple(t.shape) != (r, r):
                raise SharedLLMError(f"LoRA-XS adapter: site {site[:60]!r} needs R [{r}, {r}]")
            self._basis(site, r)
            out[site] = t.float().to(self.device)
        if len(out) != len(named):
            raise SharedLLMError("LoRA-XS adapter: tensors beyond the R of its targeted linears")
        return XSState(out, r)

    def batch(self, states: list) -> dict:
        """site -> [(rows, V_r^T [r, K], U_r S_r [N, r], R^T [b', r, r], all rows in order?)], one per rank."""
        view: dict = {}
        for rank, idx, members, everyone in row_groups(states, lambda st: st.rank, self.device):
            for site in members[0].sites:
                us, vt = self._basis(site, rank)
                rt = torch.stack([st.sites[site] for st in members]).transpose(1, 2)
                view.setdefault(site, []).append((idx, vt, us, rt, everyone))
        return view

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, vt, us, rt, everyone in view.get(site, ()):
            xs = x if everyone else x.index_select(0, rows)
            flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # [b', T, K] (T = 1 in a decode step)
            h = torch.bmm(F.linear(flat.to(vt.dtype), vt), rt)  # shared V_r^T, then each row's own R
            delta = F.linear(h, us).reshape(*xs.shape[:-1], us.shape[0])  # shared U_r S_r
            y = y + delta.to(y.dtype) if everyone else y.index_add(0, rows, delta.to(y.dtype))
        return y


class LoraXSMethod:
    name = "loraxs"
    caps = Capabilities(rows=LoraXSRows)

    def __init__(self, config: LoraXSConfig = LoraXSConfig()):
        self.config = config

    def attach(self, model):
        sites = targeted(model, self.config.targets)
        if not sites:
            raise SharedLLMError(f"LoRA-XS: this base has no decoder linear named {', '.join(self.config.targets)}")
        for name, mod in sites.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, XSLinear(mod, self.config.rank))
        return model

    def trainable(self, model) -> dict:
        return {n: p for n, p in model.named_parameters() if n.endswith(f".{PARAM}")}


register(LoraXSMethod())
