"""Re-encoding an adapter file under another scheme, and the per-user compression policy's measurement.

`encoded` writes the adapter's values under one scheme (raw float16 or an int8 scheme of adapter_int8.py) keeping
its metadata; `policy_for` scores every scheme on a user's held-out tokens and returns policy.py's decision.
"""
from __future__ import annotations

from .. import wire
from ..adapters import adapter_state
from ..personalise import Adapted, evaluate_on, load_adapted
from . import adapter_int8, policy

DROPPED_ON_REENCODE = ("scheme", "channel_block", "policy")  # metadata that describes the old encoding


def encoded(flat, layout, base_state, meta: dict, scheme: str, extra: dict | None = None) -> bytes:
    """The adapter file bytes for `scheme`, keeping the original metadata (method, binding, training info)."""
    keep = {k: v for k, v in meta.items() if k not in DROPPED_ON_REENCODE}
    keep["compressed_from"] = meta.get("compressed_from") or meta.get("scheme", policy.RAW)
    if scheme == policy.RAW:
        return wire.adapter_bytes({"adapter": flat.half()}, {**keep, "scheme": scheme, **(extra or {})})
    tensors, fields = adapter_int8.encode(flat, layout, base_state, scheme)
    return wire.adapter_bytes(tensors, {**keep, **fields, **(extra or {})})


def encode_adapter(base, adapted: Adapted, scheme: str, extra: dict | None = None) -> bytes:
    """`encoded` for a loaded adapter on its base."""
    flat, layout = wire.flatten(adapter_state(adapted.params)), wire.layout_of(adapted.params)
    return encoded(flat, layout, dict(base.model.named_parameters()), adapted.meta or {}, scheme, extra)


def payload_bytes(data: bytes) -> int:
    """Tensor data bytes of an adapter file (what the policy compares; headers differ only by names)."""
    return sum(t.numel() * t.element_size() for t in wire.parse_file(data, "encoded")[0].values())


def policy_for(base, raw: Adapted, heldout, window: int = 256, max_tokens: int | None = None,
               source: str = "adapter") -> dict:
    """Score no adapter, raw and every int8 scheme of adapter `raw` on `heldout` tokens; the policy's verdict."""
    ppl = lambda model: evaluate_on(model, base, heldout, window, max_tokens)  # noqa: E731
    cands = []
    for scheme in adapter_int8.SCHEMES:
        data = encode_adapter(base, raw, scheme)
        model = load_adapted(base, data=data, source=f"{source} as {scheme}").model
        cands.append(policy.Candidate(scheme, len(data), ppl(model)["ppl"], payload_bytes(data)))
    raw_bytes = encode_adapter(base, raw, policy.RAW)
    r = ppl(raw.model)
    raw_cand = policy.Candidate(policy.RAW, len(raw_bytes), r["ppl"], payload_bytes(raw_bytes))
    out = policy.decide(ppl(base.model)["ppl"], raw_cand, cands)
    out.update({"eval_tokens": r["tokens"], "window": window})
    return out
