"""int4 group-wise adapter schemes, for any method's flat tensor. The file keeps `adapter` (U8, two 4-bit codes
per byte), `scales` and `offsets` (F16, one each per group); a group is G consecutive values of one tensor
(int4-g32: G = 32, int4-g64: G = 64; a tensor's last group may be shorter), never straddling two tensors.

Asymmetric (min/max): value = offset + code x scale, code in 0..15. Chosen over symmetric (offset 0, codes
-7..7) because the scheme is for every method: norm and (IA)^3 tensors are gains near 1.0, where a symmetric grid
spends its steps on [-max, 0) and its step is ~max/7 ~ 0.15; an offset puts all 16 levels on the group's own range.
On zero-centred LoRA factors it is no worse per value (16 levels over max - min vs 15 over 2 max|w|) for 16 more
bits per group: 4.5 -> 5 bits per value at G = 32, 4.25 -> 4.5 at G = 64.

The offset is the group's minimum rounded *down* to fp16 and the scale (max - offset) / 15 rounded *up*, so that
every value lies on the grid's span and comes back within half a step (scale / 2) of itself, fp16 metadata and all.
The file-format part (unpacking, decoding and its checks) lives in sharedllm.wire, like int8's.
"""
from __future__ import annotations

import math

import torch

from ..errors import SharedLLMError
from ..wire import INT4_GROUPS, INT4_SCHEMES, check_int4_scheme, decode_int4, pack_nibbles, segments

SCHEMES = INT4_SCHEMES
LEVELS = 15  # codes 0..15
__all__ = ["SCHEMES", "decode", "encode", "max_error", "INT4_GROUPS"]


def decode(tensors: dict, meta: dict, layout, base_state=None, source: str = "int4") -> torch.Tensor:
    """wire.decode_int4 (base_state unused: int4 codes are relative to zero)."""
    return decode_int4(tensors, meta, layout, source)


def _group_ranges(x: torch.Tensor, shapes: list, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (wire.segments order): min and max, vectorised per tensor (full groups, then its tail)."""
    mins, maxs, at = [], [], 0
    for shape in shapes:
        n = math.prod(shape)
        t, at = x[at: at + n], at + n
        full = n // g
        if full:
            body = t[: full * g].view(full, g)
            mins.append(body.min(1).values)
            maxs.append(body.max(1).values)
        if n % g:
            mins.append(t[full * g:].min().reshape(1))
            maxs.append(t[full * g:].max().reshape(1))
    empty = torch.zeros(0)
    return (torch.cat(mins) if mins else empty), (torch.cat(maxs) if maxs else empty)


def _fp16_down(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _fp16_up(v: torch.Tensor) -> torch.Tensor:
    h = v.half()
    return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def grid(flat: torch.Tensor, layout, scheme: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(fp16 offsets, fp16 scales, segment lengths) of `flat` under `scheme`."""
    g = check_int4_scheme(scheme, "compress")
    x = flat.float().cpu()
    shapes = [s for _, s in layout]
    lo, hi = _group_ranges(x, shapes, g)
    offsets = _fp16_down(lo)
    scales = _fp16_up((hi - offsets.float()) / LEVELS)
    # a constant group sitting exactly on its fp16 offset: every code is 0 and any scale is exact
    scales = torch.where(scales > 0, scales, torch.full_like(scales, 2.0 ** -24))
    if not (torch.isfinite(offsets).all() and torch.isfinite(scales).all()):
        raise SharedLLMError("int4: a group's range does not fit float16 offsets and scales")
    return offsets, scales, segments(shapes, scheme)


def encode(flat: torch.Tensor, layout, base_state=None, scheme: str = "int4-g32") -> tuple[dict, dict]:
    """flat fp32 adapter -> ({'adapter': U8 packed codes, 'scales': F16, 'offsets': F16}, metadata fields)."""
    offsets, scales, segs = grid(flat, layout, scheme)
    reps = torch.tensor(segs, dtype=torch.long)
    o = torch.repeat_interleave(offsets.float(), reps)
    s = torch.repeat_interleave(scales.float(), reps)
    codes = torch.round((flat.float().cpu() - o) / s).clamp(0, LEVELS)
    return {"adapter": pack_nibbles(codes), "scales": scales, "offsets": offsets}, {"scheme": scheme}


def max_error(flat: torch.Tensor, layout, scheme: str, base_state=None) -> torch.Tensor:
    """The round-trip error bound per value: half a step (its group's fp16 scale / 2)."""
    _, scales, segs = grid(flat, layout, scheme)
    return torch.repeat_interleave(scales.float() / 2, torch.tensor(segs, dtype=torch.long))
