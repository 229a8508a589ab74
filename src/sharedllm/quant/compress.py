"""Re-encoding an adapter file under another scheme, and the per-user compression policy's measurement.

`encoded` writes the adapter's values under one scheme (raw float16, an int8 scheme of adapter_int8.py or an int4
scheme of adapter_int4.py) keeping its metadata; a compression *spec* is a scheme, or `rankR+SCHEME` for a LoRA
first truncated to rank R (lora_rank.py). `policy_for` scores every spec on a user's held-out tokens and returns
policy.py's decision.
"""
from __future__ import annotations

from .. import wire
from ..adapters import adapter_state
from ..errors import SharedLLMError
from ..personalise import Adapted, evaluate_on, load_adapted
from . import adapter_int4, adapter_int8, lora_rank, policy

DROPPED_ON_REENCODE = ("scheme", "channel_block", "policy", "joint")  # metadata that describes the old encoding
SCHEMES = (policy.RAW, *adapter_int8.SCHEMES, *adapter_int4.SCHEMES)
POLICY_RANK_SCHEMES = (policy.RAW, "int4-g64")  # what a rank-truncated candidate of the policy is written as


def encoded(flat, layout, base_state, meta: dict, scheme: str, extra: dict | None = None) -> bytes:
    """The adapter file bytes for `scheme`, keeping the original metadata (method, binding, training info); params,
    layout hash and shapes are those of `layout` (a rank-truncated LoRA has new ones)."""
    keep = {k: v for k, v in meta.items() if k not in DROPPED_ON_REENCODE}
    keep["compressed_from"] = meta.get("compressed_from") or meta.get("scheme", policy.RAW)
    keep.update(params=int(flat.numel()), layout=wire.layout_hash(layout), shapes=[list(s) for _, s in layout])
    if scheme == policy.RAW:
        return wire.adapter_bytes({"adapter": flat.half()}, {**keep, "scheme": scheme, **(extra or {})})
    if scheme in adapter_int4.SCHEMES:
        tensors, fields = adapter_int4.encode(flat, layout, base_state, scheme)
    else:
        tensors, fields = adapter_int8.encode(flat, layout, base_state, scheme)
    return wire.adapter_bytes(tensors, {**keep, **fields, **(extra or {})})


def parse_spec(spec: str) -> tuple[int | None, str]:
    """'int4-g64' -> (None, 'int4-g64'); 'rank2+int4-g64' -> (2, 'int4-g64'); 'rank2' -> (2, 'float16')."""
    rank, scheme = None, spec
    if spec.startswith("rank"):
        head, _, scheme = spec.partition("+")
        scheme = scheme or policy.RAW
        if not head[4:].isdigit():
            raise SharedLLMError(f"compression spec {spec[:40]!r}: rankR[+SCHEME] needs a whole number R")
        rank = int(head[4:])
    if scheme not in SCHEMES:
        raise SharedLLMError(f"compression spec {spec[:40]!r}: unknown scheme {scheme[:20]!r}; known: "
                             f"{', '.join(SCHEMES)}")
    return rank, scheme


def spec_name(rank: int | None, scheme: str) -> str:
    return scheme if rank is None else f"rank{rank}+{scheme}"


def encode_adapter(base, adapted: Adapted, scheme: str, extra: dict | None = None) -> bytes:
    """`encoded` for a loaded adapter on its base; `scheme` may be a spec (rankR+SCHEME truncates a LoRA first)."""
    rank, scheme = parse_spec(scheme)
    if rank is not None:
        adapted = lora_rank.truncated(base, adapted, rank)
    flat, layout = wire.flatten(adapter_state(adapted.params)), wire.layout_of(adapted.params)
    return encoded(flat, layout, dict(base.model.named_parameters()), adapted.meta or {}, scheme, extra)


def payload_bytes(data: bytes) -> int:
    """Tensor data bytes of an adapter file (what the policy compares; headers differ only by names)."""
    return sum(t.numel() * t.element_size() for t in wire.parse_file(data, "encoded")[0].values())


def candidate_specs(adapted: Adapted) -> list[str]:
    """What the policy tries: every int8 and int4 scheme, and for a LoRA of rank r each halving r/2, r/4, ... >= 1
    as float16 and int4-g64."""
    specs = [*adapter_int8.SCHEMES, *adapter_int4.SCHEMES]
    if lora_rank.truncatable(adapted):
        r = adapted.config.rank // 2
        while r >= 1:
            specs += [spec_name(r, s) for s in POLICY_RANK_SCHEMES]
            r //= 2
    return specs


def policy_for(base, raw: Adapted, heldout, window: int = 256, max_tokens: int | None = None,
               source: str = "adapter", tolerance: float = policy.TOLERANCE, specs: list[str] | None = None) -> dict:
    """Score no adapter, raw and every candidate spec of adapter `raw` on `heldout` tokens; the policy's verdict."""
    ppl = lambda model: evaluate_on(model, base, heldout, window, max_tokens)  # noqa: E731
    cands = []
    for spec in specs if specs is not None else candidate_specs(raw):
        data = encode_adapter(base, raw, spec)
        model = load_adapted(base, data=data, source=f"{source} as {spec}").model
        cands.append(policy.Candidate(spec, len(data), ppl(model)["ppl"], payload_bytes(data)))
    raw_bytes = encode_adapter(base, raw, policy.RAW)
    r = ppl(raw.model)
    raw_cand = policy.Candidate(policy.RAW, len(raw_bytes), r["ppl"], payload_bytes(raw_bytes))
    out = policy.decide(ppl(base.model)["ppl"], raw_cand, cands, tolerance)
    out.update({"eval_tokens": r["tokens"], "window": window})
    return out
