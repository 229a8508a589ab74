"""int8 adapter schemes. The adapter file keeps its one flat tensor `adapter` (now int8) plus `scales` (fp32);
tensor boundaries come from the metadata's `shapes`, names from the method's layout on the base.

int8          per tensor, symmetric: scale = max|w| / 127, q = round(w / scale), w' = q * scale (Bet 53's scheme).
int8-channel  per channel: one scale per row of a >= 2-D tensor, per block of 64 values of a 1-D vector.
int8-delta    per tensor, symmetric, on the difference from the base's own value of the same tensor
              (w - w_base; tensors the base does not have, e.g. LoRA factors, are taken from zero):
              the per-user signal of norm gains near 1.0 gets far finer steps.

This module quantises (encode, max_error). The file-format part (segments, the base reference of int8-delta,
decoding and its checks) lives with the format in sharedllm.wire, which dequantises a file once per parse; `SCHEMES`,
`CHANNEL_BLOCK` and `decode` are wire's, re-exported here.
"""
from __future__ import annotations

import torch

from ..wire import CHANNEL_BLOCK, INT8_SCHEMES, check_int8_scheme, int8_reference, segments
from ..wire import decode_int8 as decode

SCHEMES = INT8_SCHEMES
__all__ = ["CHANNEL_BLOCK", "SCHEMES", "decode", "encode", "max_error"]


def encode(flat: torch.Tensor, layout, base_state: dict | None, scheme: str) -> tuple[dict, dict]:
    """flat fp32 adapter -> ({'adapter': int8, 'scales': fp32}, metadata fields to merge)."""
    check_int8_scheme(scheme, "compress")
    x = flat.float().cpu() - int8_reference(layout, base_state, scheme)
    segs = segments([s for _, s in layout], scheme)
    parts = torch.split(x, segs)
    scales = torch.stack([p.abs().max() / 127 if p.numel() else torch.tensor(0.0) for p in parts])
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero run: any scale is exact
    q = torch.cat([torch.round(p / s).clamp(-127, 127) for p, s in zip(parts, scales)]).to(torch.int8)
    meta = {"scheme": scheme}
    if scheme == "int8-channel":
        meta["channel_block"] = CHANNEL_BLOCK
    return {"adapter": q, "scales": scales.float()}, meta


def max_error(flat: torch.Tensor, layout, scheme: str, base_state: dict | None = None) -> torch.Tensor:
    """The round-trip error bound per value: half a step of its run's scale."""
    x = flat.float() - int8_reference(layout, base_state, scheme)
    segs = segments([s for _, s in layout], scheme)
    steps = torch.stack([p.abs().max() / 127 for p in torch.split(x, segs)])
    return torch.repeat_interleave(steps / 2, torch.tensor(segs, dtype=torch.long))
