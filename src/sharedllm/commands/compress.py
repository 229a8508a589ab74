"""sharedllm compress: re-encode an adapter file as int8 (one scheme, or the per-user policy's choice)."""
from __future__ import annotations

from pathlib import Path

from .. import wire
from ..adapters import adapter_state
from ..atomic import write_bytes_atomic
from ..base import load_base
from ..cli import add_base_args, say
from ..data import load_user
from ..errors import SharedLLMError
from ..personalise import evaluate_on, load_adapted
from ..quant import adapter_int8, policy
from .adapt import add_eval_args

HELP = "compress an adapter (int8 | int8-channel | int8-delta), or let --policy pick per user from held-out ppl"


def configure(p) -> None:
    p.add_argument("--adapter", required=True, help="adapter file to compress")
    p.add_argument("--out", required=True, help="compressed adapter file to write")
    p.add_argument("--scheme", choices=[policy.RAW, *adapter_int8.SCHEMES], default=None)
    p.add_argument("--policy", action="store_true",
                   help="evaluate every scheme on --text's held-out 20 %% and ship the smallest acceptable one")
    p.add_argument("--text", default=None, help="the user's text (for --policy)")
    add_base_args(p)
    add_eval_args(p)


def encoded(flat, layout, base_state, meta: dict, scheme: str, extra: dict | None = None) -> bytes:
    """The adapter file bytes for `scheme`, keeping the original metadata (method, binding, training info)."""
    keep = {k: v for k, v in meta.items() if k not in ("scheme", "channel_block", "policy")}
    keep["compressed_from"] = meta.get("compressed_from") or meta.get("scheme", policy.RAW)
    if scheme == policy.RAW:
        return wire.adapter_bytes({"adapter": flat.half()}, {**keep, "scheme": scheme, **(extra or {})})
    tensors, fields = adapter_int8.encode(flat, layout, base_state, scheme)
    return wire.adapter_bytes(tensors, {**keep, **fields, **(extra or {})})


def run(args) -> dict:
    if args.policy == (args.scheme is not None):
        raise SharedLLMError("give exactly one of --scheme SCHEME or --policy")
    if args.policy and not args.text:
        raise SharedLLMError("--policy needs --text (the user's text; its last 20 % is scored)")
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    raw = load_adapted(base, args.adapter)
    flat, layout = wire.flatten(adapter_state(raw.params)), wire.layout_of(raw.params)
    base_state = dict(base.model.named_parameters())
    if args.scheme:
        data = encoded(flat, layout, base_state, raw.meta, args.scheme)
        result = {"scheme": args.scheme}
    else:
        decision = run_policy(args, base, raw, flat, layout, base_state)
        data = encoded(flat, layout, base_state, raw.meta, decision["decision"], {"policy": decision})
        result = {"scheme": decision["decision"], "policy": decision}
    load_adapted(base, data=data, source=args.out)  # what we write must load on this base
    write_bytes_atomic(args.out, data)
    return {**result, "out": args.out, "bytes": len(data), "bytes_in": Path(args.adapter).stat().st_size,
            "method": raw.method, "params": raw.n_params}


def run_policy(args, base, raw, flat, layout, base_state) -> dict:
    user = load_user(args.text, base.tokenizer).check(1, args.window)
    say(f"scoring {user.source}'s held-out text: no adapter, raw, {', '.join(adapter_int8.SCHEMES)}")
    out = policy_for(base, raw, user.heldout, args.window, args.eval_tokens or None, source=args.adapter)
    out["text"] = Path(args.text).name
    return out


def policy_for(base, raw, heldout, window: int = 256, max_tokens: int | None = None, source: str = "adapter") -> dict:
    """Score no adapter, raw and every int8 scheme of adapter `raw` on `heldout` tokens; the policy's verdict."""
    flat, layout = wire.flatten(adapter_state(raw.params)), wire.layout_of(raw.params)
    base_state = dict(base.model.named_parameters())
    ppl = lambda model: evaluate_on(model, base, heldout, window, max_tokens)  # noqa: E731
    cands = []
    for scheme in adapter_int8.SCHEMES:
        data = encoded(flat, layout, base_state, raw.meta or {}, scheme)
        model = load_adapted(base, data=data, source=f"{source} as {scheme}").model
        cands.append(policy.Candidate(scheme, len(data), ppl(model)["ppl"], _payload(data)))
    raw_bytes = encoded(flat, layout, base_state, raw.meta or {}, policy.RAW)
    r = ppl(raw.model)
    out = policy.decide(ppl(base.model)["ppl"], policy.Candidate(policy.RAW, len(raw_bytes), r["ppl"], _payload(raw_bytes)), cands)
    out.update({"eval_tokens": r["tokens"], "window": window})
    return out


def _payload(data: bytes) -> int:
    return sum(t.numel() * t.element_size() for t in wire.parse_file(data, "encoded")[0].values())


def render(r: dict) -> str:
    head = (f"{r['out']}: {r['method']} adapter, {r['params']:,} params, scheme {r['scheme']}, "
            f"{r['bytes_in']:,} -> {r['bytes']:,} bytes")
    return head if "policy" not in r else policy.table(r["policy"]) + "\n" + head
