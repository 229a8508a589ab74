"""Compressed LoRA (issue 32 item 1): for a few users, train (or reuse) a LoRA-r4 adapter, then score every
compression scheme on the user's held-out 20 %: file bytes, tensor payload, held-out ppl and ppl / raw ppl, beside
the bare base; and what `compress --policy` ships under its rule (sharedllm.rule, 2 % of the best).

    OMP_NUM_THREADS=1 nice python bench/lora_compress.py [--base default|qwen2.5-coder-0.5b] [--steps 100]
    python bench/lora_compress.py --merge out/a.json out/b.json [--out merged.json]   # users run in parallel

Adapters are cached under --cache (default out/lora_compress/BASE/USER.safetensors) and reused when they load on
this base and were trained with the same steps / batch / seq / lr / seed (delete them to retrain). The result is
one JSON (--out) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sharedllm import wire
from sharedllm.base import load_base
from sharedllm.data import load_user
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import evaluate_on, load_adapted, personalise, save_adapted
from sharedllm.quant import policy
from sharedllm.quant.compress import encode_adapter, payload_bytes
from sharedllm.recipes import recipe_lr
from sharedllm.train import TrainConfig

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
USERS = {"programmer": "programmer/cpython_asyncio.txt", "novelist": "novelist/austen_pride_and_prejudice.txt",
         "scientist": "scientist/arxiv_astro_ph.txt"}
SPECS = ["int8", "int8-channel", "int8-delta", "int4-g32", "int4-g64", "rank2+float16", "rank1+float16",
         "rank2+int4-g64", "rank1+int4-g64"]


def trained(base, user: str, data, cfg: TrainConfig, cache: Path):
    """The user's LoRA-r4 (cached file reused when it loads here and its train config is cfg's)."""
    path = cache / f"{user}.safetensors"
    if path.is_file():
        try:
            ad = load_adapted(base, path)
            if ad.meta.get("train", {}) == cfg.to_json() and ad.config.rank == 4:
                return path, ad, None
        except SharedLLMError as e:
            print(f"{path}: not reused ({e})", flush=True)
    t0 = time.time()
    ad = personalise(base, data.train, "lora", cfg, label=f"lora-r4 {user}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapted(ad, path, base, info={"user_text": user})
    return path, load_adapted(base, path), round(time.time() - t0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", default=",".join(USERS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="default: the recommended LoRA lr (sharedllm.recipes)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print the table of these results (users of one base, e.g. run in parallel) and exit")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "users": {u: r for part in parts for u, r in part["users"].items()}}
        assert all(p["base_fingerprint"] == merged["base_fingerprint"] and p["train"] == merged["train"]
                   for p in parts), "results of other bases or train configs"
        if args.out:
            Path(args.out).write_text(json.dumps(merged, indent=1))
        print(markdown(merged))
        return
    base = load_base(args.base)
    lr = args.lr if args.lr is not None else recipe_lr("lora", base.name).lr
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, lr=lr)
    cache = Path(args.cache or f"out/lora_compress/{base.name}")
    out_path = Path(args.out or f"out/lora_compress_{base.name}.json")
    result = {"base": base.name, "base_fingerprint": base.fingerprint, "train": cfg.to_json(),
              "eval_tokens": args.eval_tokens, "window": args.window, "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "users": {}}
    for user in args.users.split(","):
        data = load_user(CORPORA / USERS[user], base.tokenizer)
        path, raw, train_s = trained(base, user, data, cfg, cache)
        ppl = lambda model: evaluate_on(model, base, data.heldout, args.window, args.eval_tokens)  # noqa: E731
        t0 = time.time()
        none, r = ppl(base.model), ppl(raw.model)
        raw_bytes = path.read_bytes()
        rows = {"float16": {"bytes": len(raw_bytes), "payload": payload_bytes(raw_bytes), "ppl": r["ppl"],
                            "params": raw.n_params}}
        for spec in SPECS:
            blob = encode_adapter(base, raw, spec)
            ad = load_adapted(base, data=blob, source=f"{user} {spec}")
            rows[spec] = {"bytes": len(blob), "payload": payload_bytes(blob), "ppl": ppl(ad.model)["ppl"],
                          "params": ad.n_params}
            if "truncated_from" in ad.meta:
                rows[spec]["rel_error_max"] = ad.meta["truncated_from"]["rel_error_max"]
        for row in rows.values():
            row["ppl_vs_raw"] = row["ppl"] / r["ppl"]
        decision = policy.decide(none["ppl"], policy.Candidate("float16", rows["float16"]["bytes"], r["ppl"],
                                                               rows["float16"]["payload"]),
                                 [policy.Candidate(s, rows[s]["bytes"], rows[s]["ppl"], rows[s]["payload"])
                                  for s in SPECS])
        result["users"][user] = {"no_adapter_ppl": none["ppl"], "eval_tokens": r["tokens"], "train_s": train_s,
                                 "score_s": round(time.time() - t0, 1), "schemes": rows,
                                 "policy": decision["decision"]}
        print(f"{user}: base {none['ppl']:.3f}, raw {r['ppl']:.3f}; policy ships {decision['decision']}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(result: dict) -> str:
    users = list(result["users"])
    first = result["users"][users[0]]["schemes"]
    head = ["scheme", "file bytes", "payload", *[f"{u} ppl (/raw)" for u in users]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| no adapter | 0 | 0 | " + " | ".join(
        f"{result['users'][u]['no_adapter_ppl']:.3f} ({result['users'][u]['no_adapter_ppl'] / result['users'][u]['schemes']['float16']['ppl']:.3f})"  # noqa: E501
        for u in users) + " |")
    for spec, row in first.items():
        cells = [f"{result['users'][u]['schemes'][spec]['ppl']:.3f} ({result['users'][u]['schemes'][spec]['ppl_vs_raw']:.4f})"  # noqa: E501
                 for u in users]
        lines.append(f"| {spec} | {row['bytes']:,} | {row['payload']:,} | " + " | ".join(cells) + " |")
    lines.append("| policy ships | | | " + " | ".join(result["users"][u]["policy"] for u in users) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
