"""Ternary PTQ of a base, method by method, side by side in one run: file bytes, decoder-linear bits/weight,
general-text ppl (last 20 % of the general corpus; calibration uses only its first 80 %), the held-out ppl of
three users, quantisation wall time. Every quantised model is scored after a save -> load round trip.

    OMP_NUM_THREADS=1 nice python bench/ternary_ptq.py [--base default] [--repair-steps 60] [--out out/ternary]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from sharedllm.base import load_base
from sharedllm.data import load_user
from sharedllm.personalise import evaluate_on
from sharedllm.quant.calibration import calibration_tokens
from sharedllm.quant.ptq import METHODS, PTQConfig
from sharedllm.quant.repair import repair
from sharedllm.quant.ternary import decoder_linears, load_quantised, save_ternary_base

CORPORA = Path(__file__).resolve().parents[1] / "data" / "corpora"
GENERAL = CORPORA / "general" / "wikipedia_squad_paragraphs.txt"
USERS = {"programmer": "programmer/cpython_asyncio.txt", "novelist": "novelist/austen_pride_and_prejudice.txt",
         "scientist": "scientist/arxiv_astro_ph.txt"}


def log(msg):
    print(f"[bench] {msg}", flush=True)


def score(model, base, texts, args) -> dict:
    r = {"general": evaluate_on(model, base, texts["general"], 256, args.general_tokens)["ppl"]}
    for u, toks in texts.items():
        if u != "general":
            r[u] = evaluate_on(model, base, toks, 256, args.user_tokens)["ppl"]
    return r


def held_out(base) -> dict:
    texts = {"general": load_user(GENERAL, base.tokenizer).heldout}
    texts.update({u: load_user(CORPORA / p, base.tokenizer).heldout for u, p in USERS.items()})
    return texts


def finish(name, model, q, base, texts, wall, cfg, method, args) -> dict:
    path = Path(args.out) / f"{args.base}_{name}.safetensors"
    meta = save_ternary_base(path, model, base.tokenizer, q, {
        "method": method, "params": cfg.used(method), "source_fingerprint": base.fingerprint,
        "source_name": base.name, "quantize_wall_s": round(wall, 1)})
    loaded = load_base(str(path))  # score what the file gives back, not what is in memory
    t0 = time.time()
    ppl = score(loaded.model, loaded, texts, args)
    row = {"method": name, "file": str(path), "bytes": meta["bytes"], "bits_per_weight": meta["bits_per_weight"],
           "kept_int8": sum(k != "ternary" for k in meta["kinds"].values()), "quantize_wall_s": round(wall, 1),
           "eval_s": round(time.time() - t0, 1), **{f"ppl_{k}": v for k, v in ppl.items()}}
    log(json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--methods", default="absmean,asym,gptq-asym")
    ap.add_argument("--repair-steps", type=int, default=60)
    ap.add_argument("--repair-on", default="gptq-asym", help="methods that also get the repair pass")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--repair-batch", type=int, default=4)
    ap.add_argument("--keep-err", type=float, default=PTQConfig().keep_err)
    ap.add_argument("--general-tokens", type=int, default=8192)
    ap.add_argument("--user-tokens", type=int, default=4096)
    ap.add_argument("--out", default="out/ternary")
    ap.add_argument("--resume", default=None, help="a ternary file to continue repairing (--repair-steps more)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    texts = held_out(base)
    calib = calibration_tokens(GENERAL, base.tokenizer)
    cfg = PTQConfig(calib_seqs=args.calib_seqs, keep_err=args.keep_err, repair_steps=args.repair_steps,
                    repair_batch=args.repair_batch)
    n = sum(m.weight.numel() for m in decoder_linears(base.model).values())
    rows = [{"method": "fp (source)", "bits_per_weight": 32.0, "decoder_linear_weights": n,
             **{f"ppl_{k}": v for k, v in score(base.model, base, texts, args).items()}}]
    log(json.dumps(rows[0]))
    if args.resume:
        rows.append(resume(args, base, texts, calib, cfg))
        (Path(args.out) / f"bench_{args.base}_resume.json").write_text(json.dumps(rows, indent=1))
        print(table(rows))
        return
    for method in args.methods.split(","):
        t0 = time.time()
        student = copy.deepcopy(base.model)
        q = METHODS[method](student, calib if method == "gptq-asym" else None, cfg)
        with torch.no_grad():
            for name, m in decoder_linears(student).items():
                m.weight.copy_(q[name].dequant())
        wall = time.time() - t0
        rows.append(finish(method, student, q, base, texts, wall, cfg, method, args))
        if args.repair_steps and method in args.repair_on.split(","):
            t1 = time.time()
            q = repair(student, base.model, q, calib, cfg)
            wall += time.time() - t1
            rows.append(finish(f"{method}+repair{args.repair_steps}", student, q, base, texts, wall, cfg, method,
                               args))
        del student
        (Path(args.out) / f"bench_{args.base}.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


def resume(args, base, texts, calib, cfg) -> dict:
    """Continue the repair of a saved file: its steps and wall time add to the new ones."""
    student, q, meta = load_quantised(args.resume)
    done = meta["params"].get("repair_steps", 0) if "+repair" in Path(args.resume).stem else 0
    cfg.seed += done  # fresh calibration windows, not a replay of the first pass
    t0 = time.time()
    q = repair(student, base.model, q, calib, cfg)
    wall = meta["quantize_wall_s"] + time.time() - t0
    cfg.repair_steps += done
    name = f"{meta['method']}+repair{cfg.repair_steps}"
    return finish(name, student, q, base, texts, wall, cfg, meta["method"], args)


def table(rows) -> str:
    head = "| method | bits/weight | file MB | int8 kept | general ppl | programmer | novelist | scientist | quant s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.4f} | {r.get('bytes', 0) / 1e6:.1f} | "
                     f"{r.get('kept_int8', '-')} | {r['ppl_general']:.4g} | {r['ppl_programmer']:.4g} | "
                     f"{r['ppl_novelist']:.4g} | {r['ppl_scientist']:.4g} | {r.get('quantize_wall_s', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
