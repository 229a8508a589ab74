"""sharedllm compress: re-encode an adapter file as int8 (one scheme, or the per-user policy's choice)."""
from __future__ import annotations

from pathlib import Path

from ..atomic import write_bytes_atomic
from ..base import load_base
from ..data import load_user
from ..errors import SharedLLMError
from ..log import say
from ..personalise import load_adapted
from ..quant import adapter_int8, policy
from ..quant.compress import encode_adapter, policy_for
from .args import add_base_args, add_eval_args

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


def run(args) -> dict:
    if args.policy == (args.scheme is not None):
        raise SharedLLMError("give exactly one of --scheme SCHEME or --policy")
    if args.policy and not args.text:
        raise SharedLLMError("--policy needs --text (the user's text; its last 20 % is scored)")
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    raw = load_adapted(base, args.adapter)
    if args.scheme:
        data = encode_adapter(base, raw, args.scheme)
        result = {"scheme": args.scheme}
    else:
        decision = run_policy(args, base, raw)
        data = encode_adapter(base, raw, decision["decision"], {"policy": decision})
        result = {"scheme": decision["decision"], "policy": decision}
    load_adapted(base, data=data, source=args.out)  # what we write must load on this base
    write_bytes_atomic(args.out, data)
    return {**result, "out": args.out, "bytes": len(data), "bytes_in": Path(args.adapter).stat().st_size,
            "method": raw.method, "params": raw.n_params}


def run_policy(args, base, raw) -> dict:
    user = load_user(args.text, base.tokenizer).check(1, args.window)
    say(f"scoring {user.source}'s held-out text: no adapter, raw, {', '.join(adapter_int8.SCHEMES)}")
    out = policy_for(base, raw, user.heldout, args.window, args.eval_tokens or None, source=args.adapter)
    out["text"] = Path(args.text).name
    return out


def render(r: dict) -> str:
    head = (f"{r['out']}: {r['method']} adapter, {r['params']:,} params, scheme {r['scheme']}, "
            f"{r['bytes_in']:,} -> {r['bytes']:,} bytes")
    return head if "policy" not in r else policy.table(r["policy"]) + "\n" + head
