"""sharedllm compress: re-encode an adapter file (int8, int4 group-wise, LoRA rank truncation), or let --policy
pick the scheme per user, or compress a folder of users' LoRAs jointly (--joint: quant/lora_joint.py)."""
from __future__ import annotations

from pathlib import Path

from ..atomic import write_bytes_atomic
from ..base import load_base
from ..rule import TOLERANCE, check_tolerance
from ..data import load_user
from ..errors import SharedLLMError
from ..log import say
from ..personalise import load_adapted
from ..quant import lora_joint, lora_rank, policy
from ..quant.compress import SCHEMES, candidate_specs, encode_adapter, policy_for, spec_name
from .args import add_base_args, add_eval_args, positive_int

HELP = ("compress an adapter (int8 | int8-channel | int8-delta | int4-g32 | int4-g64; a LoRA also --rank R), or let "
        "--policy pick per user from held-out ppl, or --joint: a folder of LoRAs with shared bases")
JOINT_RANK, JOINT_ITERS = 8, 0


def configure(p) -> None:
    p.add_argument("--adapter", default=None, help="adapter file to compress")
    p.add_argument("--out", required=True, help="compressed adapter file to write (--joint: a folder)")
    p.add_argument("--joint", action="store_true",
                   help="compress every LoRA in --adapters DIR jointly: per site shared bases (one file, "
                        "shared-<sha256>.safetensors) and a small core per user (DIR2/USER.safetensors)")
    p.add_argument("--adapters", default=None, help="--joint: the folder of the cohort's LoRA files (one base, "
                                                    "one rank, alpha and targets)")
    p.add_argument("--joint-rank", type=positive_int, default=JOINT_RANK,
                   help=f"--joint: the shared bases' rank K (each user's core is K x K per site; default {JOINT_RANK})")
    p.add_argument("--joint-iters", type=int, default=JOINT_ITERS,
                   help=f"--joint: alternating refinement steps of the bases (default {JOINT_ITERS})")
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
    if args.joint:
        return run_joint(args)
    if args.adapter is None or args.adapters is not None:
        raise SharedLLMError("give --adapter FILE (or --joint --adapters DIR)")
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


def run_joint(args) -> dict:
    if args.adapter is not None or args.adapters is None or args.policy or args.scheme or args.rank:
        raise SharedLLMError("--joint takes --adapters DIR --out DIR2 [--joint-rank K] (no --adapter, --scheme, "
                             "--rank or --policy)")
    if not 0 <= args.joint_iters <= 100:
        raise SharedLLMError(f"--joint-iters {args.joint_iters}: use 0..100")
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    return {"joint": True, **lora_joint.compress_dir(base, args.adapters, args.out, args.joint_rank,
                                                     args.joint_iters)}


def render_joint(r: dict) -> str:
    lines = [f"{u}: {x['bytes']:,} bytes, relative error {x['rel_error']:.4f}" for u, x in r["per_user"].items()]
    lines += [f"{r['users']} users, joint rank {r['joint_rank']} (source rank {r['source_rank']}): "
              f"{r['bytes_per_user']:,} bytes per user (raw {r['raw_bytes_per_user']:,}), shared "
              f"{r['shared']} {r['shared_bytes']:,} bytes (sha256 {r['shared_sha256']})",
              f"215,000 users: {r['bytes_215k']:,} bytes (per user x 215,000 + shared once; raw "
              f"{r['raw_bytes_215k']:,})"]
    return "\n".join(lines)


def run_policy(args, base, raw) -> dict:
    user = load_user(args.text, base.tokenizer).check(1, args.window)
    say(f"scoring {user.source}'s held-out text: no adapter, raw, {', '.join(candidate_specs(raw))}")
    out = policy_for(base, raw, user.heldout, args.window, args.eval_tokens or None, source=args.adapter,
                     tolerance=args.tolerance)
    out["text"] = Path(args.text).name
    return out


def render(r: dict) -> str:
    if r.get("joint"):
        return render_joint(r)
    rank = f", rank {r['rank']}" if "rank" in r else ""
    head = (f"{r['out']}: {r['method']} adapter{rank}, {r['params']:,} params, {r['spec']} (scheme {r['scheme']}), "
            f"{r['bytes_in']:,} -> {r['bytes']:,} bytes")
    return head if "policy" not in r else policy.table(r["policy"]) + "\n" + head
