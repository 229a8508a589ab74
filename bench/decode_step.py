"""One decode step, old (HF forward + DynamicCache, `compute.decode_step`) vs new (`fastdecode.LeanDecoder`), in
one process on the default base: process CPU time per step for 1 and 16 rows (each row its own user's gains),
and how far each new variant's logits are from the old ones on the same tokens.

Every variant starts from the same prefill (a copy of one DynamicCache) and is fed the same tokens (the old
path's greedy tokens), rounds interleaved; only CPU-time ratios within one run mean anything on a loaded machine.
`--profile` adds a cProfile (process-time timer) breakdown of one old and one new step by component.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/decode_step.py [--rows 1,16] [--steps 16] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import re
import time

import torch

from sharedllm.base import load_base
from sharedllm.serve.compute import decode_step, prefill
from sharedllm.serve.fastdecode import LeanDecoder
from sharedllm.serve.kv import BatchCache
from sharedllm.adapters.norm import Gains
from sharedllm.adapters.rows import RowModel, RowState

from machine import describe


def users(rgm: RowModel, n: int) -> list[RowState]:
    out = []
    for s in range(n):
        g = torch.Generator().manual_seed(s)
        out.append(RowState("norm", Gains(tuple(v * (1 + 0.1 * torch.randn(v.shape, generator=g))
                                                for v in rgm.base_gains))))
    return out


def prompts(n: int, length: int) -> list[list[int]]:
    """Different lengths per row (left padding in the batch): length .. length + 5 (n - 1) tokens."""
    return [[1] + [200 + (7 * i + 13 * j) % 20000 for j in range(length + 5 * i)] for i in range(n)]


class Variant:
    def __init__(self, name: str, rgm: RowModel, dec: LeanDecoder | None):
        self.name, self.rgm, self.dec = name, rgm, dec

    def start(self, cache, pads):
        kv = self.dec.new_cache() if self.dec else BatchCache()
        kv.join(copy.deepcopy(cache), pads)
        return kv

    def step(self, kv, toks, stacked) -> torch.Tensor:
        if self.dec:
            return self.dec.step(kv, toks, stacked)
        return decode_step(self.rgm, kv, toks, stacked)


def run(v: Variant, cache, pads, feed: list[list[int]], stacked) -> tuple[float, list[torch.Tensor]]:
    kv, out = v.start(cache, pads), []
    t = time.process_time()
    for toks in feed:
        out.append(v.step(kv, toks, stacked))
        [int(row.argmax()) for row in out[-1]]  # greedy pick per row, as the engine does
    return (time.process_time() - t) / len(feed), out


MATMUL = ("linear", "matmul", "mm", "bmm", "addmm", "mv")


def head_cpu_s(rgm: RowModel, rows: int, n: int) -> float:
    """CPU seconds of `n` head matmuls ([rows, D] x [V, D]^T) alone: the head's share of the matmul time."""
    w = rgm.model.lm_head.weight
    x = torch.randn(rows, w.shape[1])
    torch.nn.functional.linear(x, w)
    t = time.process_time()
    for _ in range(n):
        torch.nn.functional.linear(x, w)
    return time.process_time() - t


def profile(v: Variant, cache, pads, feed, stacked) -> dict:
    """Shares of the profiled CPU time of len(feed) steps (cProfile, process-time timer) by component: matmuls
    (the head's share measured alone), the attention kernel, cache cat/copy, other torch ops (elementwise, views,
    small tensors: mostly per-op dispatch at these sizes), sampling (argmax per row), Python (time inside Python
    functions themselves: module calls, HF plumbing); mask building is inclusive (its own ops are also counted in
    the other rows). cProfile inflates Python and the small ops; the unprofiled total is the variant's cpu row."""
    kv = v.start(cache, pads)
    pr = cProfile.Profile(time.process_time)
    pr.enable()
    for toks in feed:
        [int(row.argmax()) for row in v.step(kv, toks, stacked)]
    pr.disable()
    out = dict.fromkeys(["matmuls", "attention kernel", "cache cat/copy", "other torch ops", "sampling (argmax)",
                         "Python", "mask building (inclusive)"], 0.0)
    total = 0.0
    for (file, _line, fn), (_cc, _nc, tt, ct, _callers) in pstats.Stats(pr).stats.items():
        total += tt
        op = re.sub(r"^<(built-in )?(method|function) '?([\w.]+).*", r"\3", fn).rsplit(".", 1)[-1]
        key = ("Python" if file != "~" else
               "matmuls" if op in MATMUL else
               "attention kernel" if "scaled_dot_product" in op else
               "cache cat/copy" if op in ("cat", "copy_", "index_put_", "__setitem__") else
               "sampling (argmax)" if op == "argmax" else "other torch ops")
        out[key] += tt
        if "create_causal_mask" in fn:
            out["mask building (inclusive)"] += ct
    head = min(head_cpu_s(v.rgm, len(feed[0]), len(feed)), out["matmuls"])
    out["head matmul (of matmuls)"] = head
    return {"profiled_ms_per_step": round(1000 * total / len(feed), 1)} | {k: round(x / total, 3)
                                                                            for k, x in out.items()}


def decoders(rgm: RowModel) -> dict:
    """Variant name -> a function building its decoder (None: the old HF step)."""
    return {"old": lambda: None, "lean": lambda: LeanDecoder(rgm, torch.float32, fuse=False),
            "lean-fused": lambda: LeanDecoder(rgm, torch.float32, fuse=True),
            "lean-bf16": lambda: LeanDecoder(rgm, torch.bfloat16), "lean-int8": lambda: LeanDecoder(rgm, torch.int8),
            "lean-int4": lambda: LeanDecoder(rgm, torch.int4),
            "lean-int8-head4": lambda: LeanDecoder(rgm, torch.int8, head_dtype=torch.int4),
            "lean-int4-head8": lambda: LeanDecoder(rgm, torch.int4, head_dtype=torch.int8)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--variants",
                    default="old,lean,lean-fused,lean-bf16,lean-int8,lean-int4,lean-int8-head4,lean-int4-head8")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_base("default")
    rgm = RowModel(base)
    make = decoders(rgm)
    variants = [Variant(n, rgm, make[n]()) for n in args.variants.split(",")]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": describe(),
              "threads": torch.get_num_threads(), "base": base.name, "rows": {}}
    for n in map(int, args.rows.split(",")):
        gains = users(rgm, n)
        stacked = rgm.batch(gains)
        logits, cache, pads = prefill(rgm, prompts(n, args.prompt_len), gains)
        feed, kv, toks = [], BatchCache(), logits.argmax(-1).tolist()
        kv.join(copy.deepcopy(cache), pads)
        for _ in range(args.steps):  # the old path's greedy tokens: every variant decodes these
            feed.append(toks)
            toks = decode_step(rgm, kv, toks, stacked).argmax(-1).tolist()
        cpu = {v.name: [] for v in variants}
        ref = None
        for r in range(args.rounds):
            for v in variants:
                c, out = run(v, cache, pads, feed, stacked)
                cpu[v.name].append(c)
                if r == 0 and v.name == "old":
                    ref = out
                if r == 0 and ref is not None and v.name != "old":
                    diff = max((a - b).abs().max().item() for a, b in zip(ref, out))
                    same = sum(a.argmax(-1).eq(b.argmax(-1)).sum().item() for a, b in zip(ref, out))
                    cpu[v.name + ":check"] = {"max_abs_logit_diff": diff, "greedy_equal": f"{same}/{n * len(feed)}"}
        row = {k: (min(x) * 1000 if isinstance(x, list) else x) for k, x in cpu.items()}
        if "old" in row:
            for v in variants[1:]:
                row[f"old/{v.name}"] = row["old"] / row[v.name]
        report["rows"][n] = row
        print(n, json.dumps(row), flush=True)
        if args.profile:
            row["profile"] = {v.name: profile(v, cache, pads, feed, stacked) for v in variants}
            print(n, "profile", json.dumps(row["profile"]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
