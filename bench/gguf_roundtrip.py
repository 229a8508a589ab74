"""The personalised GGUF round trip (issue 13, item 7): `sharedllm export --format gguf` of a user's adapter, loaded
by llama-cpp-python, must give the same held-out perplexity as `sharedllm eval --adapter A` (within 1 %).

Both sides score exactly the same token windows: sharedllm's tokenizer encodes the held-out 20 % of the text,
`eval_windows` cuts non-overlapping windows of --window + 1 tokens, and llama.cpp evaluates each window's first
--window tokens from an empty KV cache (logits for every position), predicting the next token as `sharedllm eval`
does. The base alone (the untouched base GGUF vs the converted base) is scored too, as the reference gap.

    PYTHONPATH=src python bench/gguf_roundtrip.py --adapter A.safetensors --text user.txt [--window 256]
        [--eval-tokens 1024] [--threads 2]

Needs `llama-cpp-python` (not a project dependency). Prints one JSON report; exits 1 if a ratio is off by > 1 %.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sharedllm import registry
from sharedllm.base import load_base
from sharedllm.cli import main as cli
from sharedllm.data import eval_windows, load_user
from sharedllm.metrics import evaluate
from sharedllm.personalise import load_adapted


def llama_ppl(gguf: Path, windows, threads: int) -> float:
    from llama_cpp import Llama

    window = windows.shape[1] - 1
    llm = Llama(model_path=str(gguf), n_ctx=window + 8, n_batch=window + 1, n_threads=threads, logits_all=True,
                verbose=False)
    nll = 0.0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w[:-1])
        logits = np.asarray(llm.scores[:window], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        nll += float((logz - logits[np.arange(window), w[1:]]).sum())
    del llm
    return math.exp(nll / windows[:, 1:].numel())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    base = load_base("default")
    user = load_user(args.text, base.tokenizer)
    windows = eval_windows(user.heldout, args.window, args.eval_tokens)
    t0 = time.perf_counter()
    ours = {"base": evaluate(base.model, base.tokenizer, windows)["ppl"],
            "adapted": evaluate(load_adapted(base, args.adapter).model, base.tokenizer, windows)["ppl"]}
    t_ours = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "user.gguf"
        if cli(["export", "--adapter", args.adapter, "--format", "gguf", "--out", str(out)]) != 0:
            return 1
        t0 = time.perf_counter()
        theirs = {"base": llama_ppl(registry.gguf_path(registry.resolve("default")), windows, args.threads),
                  "adapted": llama_ppl(out, windows, args.threads)}
        t_theirs = time.perf_counter() - t0
    ratio = {k: theirs[k] / ours[k] for k in ours}
    report = {"date": time.strftime("%Y-%m-%d"), "adapter": args.adapter, "text": args.text,
              "tokens": int(windows[:, 1:].numel()), "window": args.window, "sharedllm_ppl": ours,
              "llamacpp_ppl": theirs, "llamacpp_over_sharedllm": ratio,
              "adapter_gain_sharedllm": ours["adapted"] / ours["base"],
              "adapter_gain_llamacpp": theirs["adapted"] / theirs["base"],
              "seconds": {"sharedllm": t_ours, "llamacpp": t_theirs},
              "within_1pct": all(abs(r - 1) <= 0.01 for r in ratio.values())}
    print(json.dumps(report, indent=2))
    return 0 if report["within_1pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
