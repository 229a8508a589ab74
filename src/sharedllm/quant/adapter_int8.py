"""int8 adapter schemes. The adapter file keeps its one flat tensor `adapter` (now int8) plus `scales` (fp32);
tensor boundaries come from the metadata's `shapes`, names from the method's layout on the base.

int8          per tensor, symmetric: scale = max|w| / 127, q = round(w / scale), w' = q * scale (Bet 53's scheme).
int8-channel  per channel: one scale per row of a >= 2-D tensor, per block of 64 values of a 1-D vector.
int8-delta    per tensor, symmetric, on the difference from the base's own value of the same tensor
              (w - w_base; tensors the base does not have, e.g. LoRA factors, are taken from zero):
              the per-user signal of norm gains near 1.0 gets far finer steps.
"""
from __future__ import annotations

import math

import torch

from ..errors import SharedLLMError

CHANNEL_BLOCK = 64
SCHEMES = ("int8", "int8-channel", "int8-delta")


def _segments(shapes: list, scheme: str) -> list[int]:
    """Lengths of the consecutive runs of the flat tensor that share one scale."""
    segs = []
    for shape in shapes:
        n = math.prod(shape)
        if scheme != "int8-channel":
            segs.append(n)
        elif len(shape) >= 2:
            segs += [n // shape[0]] * shape[0]
        else:
            segs += [CHANNEL_BLOCK] * (n // CHANNEL_BLOCK) + ([n % CHANNEL_BLOCK] if n % CHANNEL_BLOCK else [])
    return segs


def _reference(layout, base_state: dict | None, scheme: str) -> torch.Tensor:
    """What the quantised values are relative to: zero, or (int8-delta) the base's own tensors."""
    n = sum(math.prod(s) for _, s in layout)
    if scheme != "int8-delta":
        return torch.zeros(n)
    if base_state is None:
        raise SharedLLMError("int8-delta needs the base's tensors")
    parts = []
    for name, shape in layout:
        b = base_state.get(name)
        ok = b is not None and tuple(b.shape) == tuple(shape)
        parts.append(b.detach().float().cpu().reshape(-1) if ok else torch.zeros(math.prod(shape)))
    return torch.cat(parts) if parts else torch.zeros(0)


def _check_scheme(scheme: str, source: str) -> None:
    if scheme not in SCHEMES:
        raise SharedLLMError(f"{source}: unknown adapter scheme {scheme!r}; known: float16, float32, "
                             f"{', '.join(SCHEMES)}")


def encode(flat: torch.Tensor, layout, base_state: dict | None, scheme: str) -> tuple[dict, dict]:
    """flat fp32 adapter -> ({'adapter': int8, 'scales': fp32}, metadata fields to merge)."""
    _check_scheme(scheme, "compress")
    x = flat.float().cpu() - _reference(layout, base_state, scheme)
    segs = _segments([s for _, s in layout], scheme)
    parts = torch.split(x, segs)
    scales = torch.stack([p.abs().max() / 127 if p.numel() else torch.tensor(0.0) for p in parts])
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero run: any scale is exact
    q = torch.cat([torch.round(p / s).clamp(-127, 127) for p, s in zip(parts, scales)]).to(torch.int8)
    meta = {"scheme": scheme}
    if scheme == "int8-channel":
        meta["channel_block"] = CHANNEL_BLOCK
    return {"adapter": q, "scales": scales.float()}, meta


def decode(tensors: dict, meta: dict, layout, base_state: dict | None, source: str) -> torch.Tensor:
    """The inverse of encode, refusing anything malformed: -> flat fp32 adapter."""
    scheme = meta.get("scheme")
    _check_scheme(scheme, source)
    if set(tensors) != {"adapter", "scales"}:
        raise SharedLLMError(f"{source}: scheme {scheme} expects tensors 'adapter' and 'scales', found "
                             f"{sorted(tensors)}")
    q, scales = tensors["adapter"], tensors["scales"]
    if q.dtype != torch.int8 or q.dim() != 1:
        raise SharedLLMError(f"{source}: 'adapter' must be a flat int8 tensor for scheme {scheme}, got {q.dtype}")
    if scheme == "int8-channel" and meta.get("channel_block") != CHANNEL_BLOCK:
        raise SharedLLMError(f"{source}: channel_block {meta.get('channel_block')}, expected {CHANNEL_BLOCK}")
    segs = _segments([s for _, s in layout], scheme)
    if q.numel() != sum(segs) or scales.numel() != len(segs):
        raise SharedLLMError(f"{source}: {q.numel()} values and {scales.numel()} scales; the layout needs "
                             f"{sum(segs)} and {len(segs)}")
    x = q.float() * torch.repeat_interleave(scales.float(), torch.tensor(segs, dtype=torch.long))
    return x + _reference(layout, base_state, scheme)


def max_error(flat: torch.Tensor, layout, scheme: str, base_state: dict | None = None) -> torch.Tensor:
    """The round-trip error bound per value: half a step of its run's scale."""
    x = flat.float() - _reference(layout, base_state, scheme)
    segs = _segments([s for _, s in layout], scheme)
    steps = torch.stack([p.abs().max() / 127 for p in torch.split(x, segs)])
    return torch.repeat_interleave(steps / 2, torch.tensor(segs, dtype=torch.long))
