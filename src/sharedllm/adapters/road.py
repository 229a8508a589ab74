"""road: RoAd (Liao et al. 2024, via PEFT's RoadConfig): each targeted linear's output is rotated pair by pair, every
2-D pair of output elements by its own learned angle theta and scale alpha:

    y0' = alpha cos(theta) y0 - alpha sin(theta) y1,    y1' = alpha sin(theta) y0 + alpha cos(theta) y1

(PEFT pairs element i of each group of `group_size` outputs with element i + group_size / 2). Per user only the
angles and scales: `road_1` (the paper's RoAd_1, the default) one (theta, alpha) per pair, N numbers per targeted
linear of width N; `road_2` one per element (2N); `road_4` two of each per element (4N). theta starts at 0 and
alpha at 1: a fresh adapter is the base exactly.

Default: road_1 on all seven projections (PEFT's own default targets are q, v), group_size 32 (PEFT's default is 64,
which only speeds up vLLM kernels; 32 divides every width of the default base, Qwen2.5-0.5B and the tiny test base).
Numbers per user = sum of targeted widths: 155,520 at the default base (SmolLM2-135M; 304 KB in fp16), 304,128 at
Qwen2.5-0.5B (594 KB). Per row (`RoadRows`), each targeted linear's output gets its rows' own two cos / sin
vectors, element-wise, gathered once per batch: no matmul and no loop over rows. Export: PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import quiet_peft_checkpointing_probe
from ..errors import SharedLLMError
from . import Capabilities, register
from .kernel import LinearRows, row_groups

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # numbers of theta (and of alpha) per output element
PREFIX = "base_model.model."
THETA, ALPHA = ".road_theta.default", ".road_alpha.default"


@dataclass(frozen=True)
class RoadConfig:
    variant: str = "road_1"
    group_size: int = 32
    targets: tuple = ALL

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise SharedLLMError(f"RoAd variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        g = self.group_size
        if not (isinstance(g, int) and not isinstance(g, bool) and 2 <= g <= 4096 and g % 2 == 0):
            raise SharedLLMError(f"RoAd group_size must be an even integer in 2..4096, got {g!r}")
        if not self.targets or not all(isinstance(t, str) and t in ALL for t in self.targets):
            raise SharedLLMError(f"RoAd targets must be among {', '.join(ALL)}, got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise SharedLLMError(f"RoAd targets must not repeat, got {self.targets!r}")


def cols(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple:
    """(alpha cos theta, alpha sin theta) per output element [N], as PEFT's road `_prepare_cols` builds them."""
    half = group_size // 2
    if variant == "road_1":
        theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
    return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), \
        alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()


def swap_halves(y: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's two halves swapped (one copy)."""
    return y.reshape(*y.shape[:-1], -1, 2, group_size // 2).flip(-2).reshape(y.shape)


def signed(second: torch.Tensor, group_size: int) -> torch.Tensor:
    """`second` with the first half of each group negated: rotate_half's sign, folded in once when packing."""
    out = second.reshape(*second.shape[:-1], -1, 2, group_size // 2).clone()
    out[..., 0, :].neg_()
    return out.reshape(second.shape)


def rotate_packed(y: torch.Tensor, first: torch.Tensor, second_signed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel's rotation with `signed(second)` precomputed at pack time: three ops per site."""
    return torch.addcmul(y * first, swap_halves(y, group_size), second_signed)


def rotate(y: torch.Tensor, first: torch.Tensor, second: torch.Tensor, group_size: int) -> torch.Tensor:
    """y * first + rotate_half(y) * second, each group's halves paired (PEFT's `_apply_road`, rows broadcast)."""
    return rotate_packed(y, first, signed(second, group_size), group_size)


@dataclass(frozen=True, eq=False)
class RoadState:
    """One user's RoAd as the kernel runs it: site -> (alpha cos theta [N], signed(alpha sin theta) [N]) fp32."""

    sites: dict
    group_size: int


class RoadRows(LinearRows):
    """The RoAd kernel: per linear site, the rows that rotate it and their two vectors [b', N], stacked per batch
    (one entry per group size present)."""

    def __init__(self, rm):
        self.shapes, self.device = rm.linear_shapes, rm.device

    def max_numbers(self) -> int:
        return 4 * sum(o for _, o in self.shapes.values())

    def pack(self, named: dict, config: RoadConfig) -> RoadState:
        sites = [s for s in self.shapes if s.rpartition(".")[2] in config.targets]
        if not sites:
            raise SharedLLMError(f"RoAd adapter: this base has no decoder linear named {', '.join(config.targets)}")
        out = {}
        for site in sites:
            n, size = self.shapes[site][1], int(self.shapes[site][1] * VARIANTS[config.variant])
            theta, alpha = named.get(site + THETA), named.get(site + ALPHA)
            if n % config.group_size or theta is None or alpha is None or theta.numel() != size \
                    or alpha.numel() != size:
                raise SharedLLMError(f"RoAd adapter: site {site[:60]!r} (width {n}) needs theta and alpha of {size} "
                                     f"numbers and a width divisible by group_size {config.group_size}")
            first, second = cols(config.variant, config.group_size, theta.float().reshape(-1),
                                 alpha.float().reshape(-1))
            out[site] = (first.to(self.device), signed(second, config.group_size).to(self.device))
        if 2 * len(out) != len(named):
            raise SharedLLMError("RoAd adapter: tensors beyond the theta and alpha of its targeted linears")
        return RoadState(out, config.group_size)

    def batch(self, states: list) -> dict:
        """site -> [(rows, first [b', N], second [b', N], group_size, all rows in order?)], one per group size."""
        view: dict = {}
        for g, idx, members, everyone in row_groups(states, lambda st: st.group_size, self.device):
            for site in members[0].sites:
                first = torch.stack([st.sites[site][0] for st in members])
                second = torch.stack([st.sites[site][1] for st in members])
                view.setdefault(site, []).append((idx, first, second, g, everyone))
        return view

    def linear(self, view: dict, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, first, second, g, everyone in view.get(site, ()):
            ys = y if everyone else y.index_select(0, rows)
            shape = (ys.shape[0], *([1] * (ys.dim() - 2)), -1)  # per-row vectors broadcast over positions
            out = rotate_packed(ys.to(first.dtype), first.view(shape), second.view(shape), g).to(y.dtype)
            y = out if everyone else y.index_copy(0, rows, out)
        return y


class RoadMethod:
    name = "road"
    caps = Capabilities(rows=RoadRows, export="peft")

    def __init__(self, config: RoadConfig = RoadConfig()):
        self.config = config

    def attach(self, model):
        from peft import RoadConfig as PeftRoadConfig
        from peft import get_peft_model

        c = self.config
        widths = {n.rpartition(".")[2]: m.out_features for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in c.targets}
        odd = sorted(t for t, n in widths.items() if n % c.group_size)
        if odd:
            raise SharedLLMError(f"RoAd group_size {c.group_size} does not divide the width of {', '.join(odd)} "
                                 f"({', '.join(str(widths[t]) for t in odd)}) on this base: choose another "
                                 "--road-group-size")
        peft_cfg = PeftRoadConfig(variant=c.variant, group_size=c.group_size, target_modules=list(c.targets))
        with quiet_peft_checkpointing_probe():
            return get_peft_model(model, peft_cfg)

    def trainable(self, model) -> dict:
        return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".road_" in n}


register(RoadMethod())
