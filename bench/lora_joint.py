"""Joint compression of a cohort of LoRAs (issue 32 item 2, `compress --joint`), judged by the confusion rule: on
each user's held-out text, does the user's own jointly compressed adapter still beat the other users' (compressed)
adapters by the margin their raw LoRAs had?

    OMP_NUM_THREADS=1 nice -n 5 python bench/lora_joint.py [--base default] [--ranks 4,8,12] [--eval-tokens 1024]

Users and their LoRA-r4 adapters are bench/lora_compress.py's (reused from its cache, out/lora_compress/BASE/, when
they were trained with the same config; trained otherwise). For each joint rank K: every user's relative error
||D - U C V^T|| / ||D|| (with 0 and --iters alternating steps), bytes per user (core file), the shared file, the
projection for 215,000 users, and the ppl of every user's text under every user's adapter (raw and joint): the
confusion matrix, and per user the margin min_{v != u} ppl(u's text | v's adapter) / ppl(u's text | own adapter).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_compress import CORPORA, USERS, trained  # noqa: E402

from sharedllm.base import load_base  # noqa: E402
from sharedllm.data import load_user  # noqa: E402
from sharedllm.personalise import evaluate_on, load_adapted  # noqa: E402
from sharedllm.quant import lora_joint  # noqa: E402
from sharedllm.recipes import recipe_lr  # noqa: E402
from sharedllm.train import TrainConfig  # noqa: E402

USERS_215K = 215_000
# a second user of each genre (trained on first use, cached beside lora_compress.py's): --users with all six
USERS = {**USERS, "programmer2": "programmer/flask.txt", "novelist2": "novelist/shelley_frankenstein.txt",
         "scientist2": "scientist/arxiv_cond_mat.txt"}


def margins(ppl: dict) -> dict:
    """{text user: {adapter user: ppl}} -> per user min over other adapters of ppl(other) / ppl(own)."""
    return {u: min(row[v] for v in row if v != u) / row[u] for u, row in ppl.items()}


def confusion(base, models: dict, heldout: dict, window: int, tokens: int) -> dict:
    out = {u: {} for u in heldout}
    for v, model in models.items():
        for u, ids in heldout.items():
            out[u][v] = evaluate_on(model, base, ids, window, tokens)["ppl"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", default="programmer,novelist,scientist")
    ap.add_argument("--ranks", default="4,8,12")
    ap.add_argument("--iters", type=int, default=2, help="alternating steps whose error is also reported")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = load_base(args.base)
    cfg = TrainConfig(steps=args.steps, batch=2, seq=256, lr=recipe_lr("lora", base.name).lr)
    cache = Path(args.cache or f"out/lora_compress/{base.name}")
    users = args.users.split(",")
    data = {u: load_user(CORPORA / USERS[u], base.tokenizer) for u in users}
    raw, paths = {}, {}
    for u in users:
        paths[u], raw[u], _ = trained(base, u, data[u], cfg, cache)
    heldout = {u: d.heldout for u, d in data.items()}
    t0 = time.time()
    ev = lambda models: confusion(base, models, heldout, args.window, args.eval_tokens)  # noqa: E731
    result = {"base": base.name, "base_fingerprint": base.fingerprint, "train": cfg.to_json(), "users": users,
              "eval_tokens": args.eval_tokens, "window": args.window, "torch_threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "no_adapter": {u: evaluate_on(base.model, base, heldout[u], args.window, args.eval_tokens)["ppl"]
                             for u in users},
              "raw": {"bytes_per_user": sum(p.stat().st_size for p in paths.values()) / len(users)}}
    result["raw"]["ppl"] = ev({u: raw[u].model for u in users})
    result["raw"]["margin"] = margins(result["raw"]["ppl"])
    result["raw"]["bytes_215k"] = result["raw"]["bytes_per_user"] * USERS_215K
    print(f"raw: margins {fmt(result['raw']['margin'])} ({time.time() - t0:.0f} s)", flush=True)
    out_path = Path(args.out or f"bench/results/lora_joint_{base.name}.json")
    result["joint"] = {}
    for k in [int(x) for x in args.ranks.split(",")]:
        result["joint"][k] = row = joint_row(base, raw, k, args, ev)
        print(f"K={k}: {row['bytes_per_user']:,.0f} B/user, rel error {fmt(row['rel_error'])} (iters "
              f"{args.iters}: {fmt(row['rel_error_iters'])}), margins {fmt(row['margin'])} "
              f"({time.time() - t0:.0f} s)", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    result["score_s"] = round(time.time() - t0)
    out_path.write_text(json.dumps(result, indent=1))
    print(markdown(result))


def joint_row(base, raw: dict, k: int, args, ev) -> dict:
    """Compress the cohort at joint rank k (iters 0, as `compress --joint` does by default), load every core file
    back as the server would (shared file by sha256 from its folder), score the confusion matrix."""
    _, _, errors_iters = lora_joint.compress_cohort(raw, k, args.iters)
    bases, cores, errors = lora_joint.compress_cohort(raw, k, 0)
    config = next(iter(raw.values())).config
    shared = lora_joint.shared_bytes(bases, config, k, base.fingerprint, len(raw), 0)
    sha = hashlib.sha256(shared).hexdigest()
    blobs = {u: lora_joint.core_bytes(raw[u], cores[u], sha, k, errors[u]) for u in raw}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / lora_joint.shared_name(sha)).write_bytes(shared)
        models = {u: load_adapted(base, data=b, source=u, shared_dirs=[d]).model for u, b in blobs.items()}
    ppl = ev(models)
    per_user = sum(len(b) for b in blobs.values()) / len(blobs)
    return {"bytes_per_user": per_user, "shared_bytes": len(shared), "bytes_215k": per_user * USERS_215K + len(shared),
            "rel_error": errors, "rel_error_iters": errors_iters, "ppl": ppl, "margin": margins(ppl)}


def fmt(d: dict) -> str:
    return ", ".join(f"{u} {v:.4f}" for u, v in d.items())


def markdown(r: dict) -> str:
    users = r["users"]
    head = ["adapters", "bytes / user", "215,000 users", *[f"{u}: own ppl (margin)" for u in users]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| no adapter | 0 | 0 | " + " | ".join(f"{r['no_adapter'][u]:.3f}" for u in users) + " |")
    rows = [("raw LoRA-r4 (fp16)", r["raw"], None)] + [(f"joint K={k}", row, row["shared_bytes"])
                                                      for k, row in r["joint"].items()]
    for name, row, shared in rows:
        size = f"{row['bytes_per_user']:,.0f}" + (f" (+ shared {shared:,})" if shared else "")
        cells = [f"{row['ppl'][u][u]:.3f} ({row['margin'][u]:.4f})" for u in users]
        lines.append(f"| {name} | {size} | {row['bytes_215k'] / 1e9:.2f} GB | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| joint K | " + " | ".join(f"{u} rel. error, iters 0 / alternating" for u in users) + " |")
    lines.append("|" + "---|" * (len(users) + 1))
    for k, row in r["joint"].items():
        lines.append(f"| {k} | " + " | ".join(f"{row['rel_error'][u]:.3f} / {row['rel_error_iters'][u]:.3f}"
                                              for u in users) + " |")
    lines.append("")
    lines.append("confusion (rows: text, columns: adapter; ppl)")
    for name, row, _ in rows:
        lines.append(f"{name}: " + "; ".join(f"{u}: " + ", ".join(f"{row['ppl'][u][v]:.2f}" for v in users)
                                            for u in users))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
