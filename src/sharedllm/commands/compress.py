"""sharedllm compress: re-encode an adapter file (int8, int4 group-wise, LoRA rank truncation), or let --policy
pick the scheme per user."""
from __future__ import annotations

from pathlib import Path

from ..atomic import write_bytes_atomic
from ..base import load_base
from ..rule import TOLERANCE, check_tolerance
from ..data import load_user
from ..errors import SharedLLMError
from ..log import say
from ..personalise import load_adapted
from ..quant import lora_rank, policy
from ..quant.compress import SCHEMES, candidate_specs, encode_adapter, policy_for, spec_name
from .args import add_base_args, add_eval_args, positive_int

HELP = ("compress an adapter (int8 | int8-channel | int8-delta | int4-g32 | int4-g64; a LoRA also --rank R), or let "
        "--policy pick per user from held-out ppl")


def configure(p) -> None:
    p.add_argument("--adapter", required=True, help="adapter file to compress")
    p.add_argument("--out", required=True, help="compressed adapter file to write")
    p.add_argument("--scheme", choices=SCHEMES, default=None,
                   help="int8 (per tensor), int8-channel, int8-delta (from the base's values), int4-g32 / int4-g64 "
                        "(4 bits, an fp16 scale and offset per 32 / 64 values), float16; with --rank: after truncating")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="LoRA only: truncate to this rank (the SVD-optimal rank-R' change per site), written as a "
                        "LoRA of rank R' (float16 unless --scheme)")
    p.add_argument("--policy", action="store_true",
                   help="evaluate every scheme on --text's held-out 20 %% and ship the smallest acceptable one")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="--policy: accept ppl within this fraction of the best candidate's (default 0.02 = 2 %%)")
    p.add_argument("--text", default=None, help="the user's text (for --policy)")
    add_base_args(p)
    add_eval_args(p)


def run(args) -> dict:
    if args.policy == (args.scheme is not None or args.rank is not None):
        raise SharedLLMError("give exactly one of --scheme SCHEME / --rank R, or --policy")
    if args.policy and not args.text:
        raise SharedLLMError("--policy needs --text (the user's text; its last 20 % is scored)")
    check_tolerance(args.tolerance)
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    raw = load_adapted(base, args.adapter)
    if not args.policy:
        if args.rank is not None and not lora_rank.truncatable(raw):
            raise SharedLLMError(f"{args.adapter}: --rank truncates LoRA adapters; this one is {raw.method!r}")
        if args.rank is not None and args.rank > raw.config.rank:
            raise SharedLLMError(f"--rank {args.rank}: {args.adapter} is a LoRA of rank {raw.config.rank}; truncate "
                                 f"to a rank in 1..{raw.config.rank}")
        spec = spec_name(args.rank, args.scheme or policy.RAW)
        data = encode_adapter(base, raw, spec)
        result = {"scheme": args.scheme or policy.RAW, "spec": spec}
    else:
        decision = run_policy(args, base, raw)
        data = encode_adapter(base, raw, decision["decision"], {"policy": decision})
        result = {"scheme": decision["decision"], "spec": decision["decision"], "policy": decision}
    out = load_adapted(base, data=data, source=args.out)  # what we write must load on this base
    write_bytes_atomic(args.out, data)
    result["scheme"] = out.meta["scheme"]
    return {**result, "out": args.out, "bytes": len(data), "bytes_in": Path(args.adapter).stat().st_size,
            "method": raw.method, "params": out.n_params, "params_in": raw.n_params,
            **({"rank": out.config.rank} if lora_rank.truncatable(out) else {})}


def run_policy(args, base, raw) -> dict:
    user = load_user(args.text, base.tokenizer).check(1, args.window)
    say(f"scoring {user.source}'s held-out text: no adapter, raw, {', '.join(candidate_specs(raw))}")
    out = policy_for(base, raw, user.heldout, args.window, args.eval_tokens or None, source=args.adapter,
                     tolerance=args.tolerance)
    out["text"] = Path(args.text).name
    return out


def render(r: dict) -> str:
    rank = f", rank {r['rank']}" if "rank" in r else ""
    head = (f"{r['out']}: {r['method']} adapter{rank}, {r['params']:,} params, {r['spec']} (scheme {r['scheme']}), "
            f"{r['bytes_in']:,} -> {r['bytes']:,} bytes")
    return head if "policy" not in r else policy.table(r["policy"]) + "\n" + head
