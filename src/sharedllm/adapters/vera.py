"""vera: VeRA (Kopiczko et al. 2024, via PEFT's VeraConfig): frozen random projections shared by every user, and
per user only two scaling vectors per targeted linear.

For a targeted linear W [N, K]: delta y = b * (B_N (d * (A_K x))), with A [r, K_max] and B [N_max, r] one pair of
frozen random matrices for every targeted linear of the base (PEFT sizes them to the largest targeted in / out width
and slices A[:, :K], B[:N, :]), regenerated from `seed` (PEFT's `projection_prng_key`: a CPU generator, Kaiming-
uniform A then B), never saved per user; the user's file holds only d [r] and b [N] per linear. b starts at zero
(a fresh adapter is the base exactly), d at `d_initial` (0.1, the paper's and PEFT's). No dropout (the per-row
kernel and fleet training are exact only without it).

Default: r = 256 (PEFT's default, one of the paper's settings) on all seven projections. Numbers per user =
sum over targeted linears of (r + N): 209,280 at the default base (SmolLM2-135M: 30 layers, widths 576 / 192 /
1536), 409 KB in fp16; 347,136 at Qwen2.5-0.5B (24 layers, 896 / 128 / 4864), 678 KB. Sharing a batch costs each
targeted linear two shared GEMMs of rank r (the base's random A, B) over the VeRA rows, then element-wise scalings
gathered per row (`VeraRows`), never a loop over rows.

Export: PEFT (save_projection=False, so the folder holds d and b only and PEFT regenerates A, B from the key).
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compat import quiet_peft_checkpointing_probe
from ..errors import SharedLLMError
from . import Capabilities, register
from .kernel import LinearRows, row_groups

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
D_SUFFIX, B_SUFFIX = ".vera_lambda_d.default", ".vera_lambda_b.default"
MAX_SERVED_RANK = 1024  # the largest r the per-row kernel takes (it bounds the server's default upload size)


@dataclass(frozen=True)
class VeraConfig:
    rank: int = 256
    targets: tuple = ALL
    seed: int = 0  # PEFT's projection_prng_key: the shared A and B are a function of it (and of rank and targets)
    d_initial: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and 1 <= self.rank <= MAX_SERVED_RANK):
            raise SharedLLMError(f"VeRA rank must be an integer in 1..{MAX_SERVED_RANK}, got {self.rank!r}")
        if not self.targets or not all(isinstance(t, str) and t in ALL for t in self.targets):
            raise SharedLLMError(f"VeRA targets must be among {', '.join(ALL)}, got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise SharedLLMError(f"VeRA targets must not repeat, got {self.targets!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2 ** 63):
            raise SharedLLMError(f"VeRA seed must be an integer in 0..2^63-1, got {self.seed!r}")
        if not (isinstance(self.d_initial, (int, float)) and math.isfinite(self.d_initial)
                and 0 < abs(self.d_initial) <= 10):
            raise SharedLLMError(f"VeRA d_initial must be a finite non-zero number of size at most 10, "
                                 f"got {self.d_initial!r}")


def _kaiming_uniform(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init (peft.tuners.vera.model._kaiming_init): uniform +-sqrt(3) * sqrt(2) / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(seed: int, rank: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A [rank, in_max] and B [out_max, rank] exactly as PEFT draws them for this key (CPU, fp32)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((rank, in_max), generator)
    return a, _kaiming_uniform((out_max, rank), generator)


def targeted(shapes: dict, targets: tuple) -> dict:
    """site -> (in, out) of the decoder linears `targets` name (by their last name component, as PEFT matches)."""
    return {s: io for s, io in shapes.items() if s.rpartition(".")[2] in targets}


@dataclass(frozen=True, eq=False)
class VeraState:
    """One user's VeRA as the kernel runs it: site -> (d [r], b [N]) fp32; `key` names the shared A, B it uses."""

    sites: dict
    key: tuple  # (seed, rank, in_max, out_max)


class VeraRows(LinearRows):
    """The VeRA kernel: per batch, the VeRA rows grouped by shared projections; per targeted site, the group's
    d [b', r] and b [b', N] stacked once, the GEMMs with A and B shared by the group."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device
        self._proj: dict = {}  # key -> (A, B) on the device (a few MB; one per seed / rank / targets in use)
        self._lock = threading.Lock()

    def max_numbers(self) -> int:
        return sum(MAX_SERVED_RANK + o for _, o in self.shapes.values())

    def _projections(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if key not in self._proj:
                self._proj[key] = tuple(t.to(self.device) for t in projections(*key))
            return self._proj[key]

    def pack(self, named: dict, config: VeraConfig) -> VeraState:
        sites = targeted(self.shapes, config.targets)
        if not sites:
            raise SharedLLMError(f"VeRA adapter: this base has no decoder linear named {', '.join(config.targets)}")
        out = {}
        for site, (_, n) in sites.items():
            d, b = named.get(site + D_SUFFIX), named.get(site + B_SUFFIX)
            if d is None or b is None or d.numel() != config.rank or b.numel() != n:
                raise SharedLLMError(f"VeRA adapter: site {site[:60]!r} needs d [{config.rank}] and b [{n}]")
            out[site] = (d.float().reshape(-1).to(self.device), b.float().reshape(-1).to(self.device))
        if 2 * len(out) != len(named):
            raise SharedLLMError("VeRA adapter: tensors beyond the d and b of its targeted linears")
        key = (config.seed, config.rank, max(k for k, _ in sites.values()), max(o for _, o in sites.values()))
        self._projections(key)
        return VeraState(out, key)

    def batch(self, states: list) -> dict:
        """site -> [(rows, A_K [r, K], B_N [N, r], d [b', r], b [b', N], all rows in order?)], one per key."""
        view: dict = {}
        for key, idx, members, everyone in row_groups(states, lambda st: st.key, self.device):
            a, b = self._projections(key)
            for site in members[0].sites:
                k, n = self.shapes[site]
                d = torch.stack([st.sites[site][0] for st in members])
                bv = torch.stack([st.sites[site][1] for st in members])
                view.setdefault(site, []).append((idx, a[:, :k], b[:n, :], d, bv, everyone))
        return view

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, a, b, d, bv, everyone in view.get(site, ()):
            xs = x if everyone else x.index_select(0, rows)
            shape = (xs.shape[0], *([1] * (xs.dim() - 2)), -1)  # per-row vectors broadcast over positions
            h = F.linear(xs.to(a.dtype), a) * d.view(shape)  # one shared GEMM, then each row's own d
            delta = bv.view(shape) * F.linear(h, b)  # one shared GEMM, then each row's own b
            y = y + delta.to(y.dtype) if everyone else y.index_add(0, rows, delta.to(y.dtype))
        return y


class VeraMethod:
    name = "vera"
    caps = Capabilities(rows=VeraRows, export="peft")

    def __init__(self, config: VeraConfig = VeraConfig()):
        self.config = config

    def attach(self, model):
        from peft import get_peft_model

        c = self.config
        peft_cfg = _peft_config(r=c.rank, target_modules=list(c.targets), projection_prng_key=c.seed,
                                  save_projection=False, vera_dropout=0.0, d_initial=float(c.d_initial), bias="none")
        with quiet_peft_checkpointing_probe():
            return get_peft_model(model, peft_cfg)

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".vera_lambda_" in n}


def _peft_config(**kwargs):
    """PEFT's VeraConfig without its UserWarning about save_projection=False: regenerating A and B from the key is
    this method's design (the same CPU generator and draws everywhere; tests compare them with PEFT's own)."""
    from peft import VeraConfig as PeftVeraConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B", category=UserWarning)
        return PeftVeraConfig(**kwargs)


register(VeraMethod())
