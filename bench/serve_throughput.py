"""Serving throughput on the default base through the real server, side by side in one run.

Three ways to serve the same 16 requests (each condition interleaved, `--rounds` times):
  mixed    16 concurrent requests from 16 different users (one batch, 16 different sets of norm gains)
  single   16 concurrent requests all from one user (one batch, one set of gains)
  peft     the same 16 users with PEFT LNTuningConfig, which allows one active adapter at a time: users one
           after another at batch 1, in-process (no HTTP cost, which favours PEFT)
Generation: greedy, --gen-tokens new tokens per request (decode tokens/s counts generated tokens over the wall
time, prefill included). Scoring: --score-chars of real text per request (scored tokens/s).

    PYTHONPATH=src python bench/serve_throughput.py [--rounds 2] [--gen-tokens 32] [--score-chars 600]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from sharedllm.arch import norm_modules
from sharedllm.base import load_base
from sharedllm.personalise import load_adapted

from serve_common import MACHINE, ServerProcess, adapter_files, create_users, fire, snippets, upload

N = 16


def peft_model(base, files: list[bytes]):
    """One PEFT LN-tuning model holding all users' adapters (PEFT deep-copies each norm per adapter)."""
    from peft import LNTuningConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n in norm_modules(base.model)})
    all_gains = [load_adapted(base, data=d, source=f"user{i}").params for i, d in enumerate(files)]
    model = get_peft_model(copy.deepcopy(base.model), LNTuningConfig(target_modules=targets), adapter_name="user0")
    for i, gains in enumerate(all_gains):
        name = f"user{i}"
        if i:
            model.add_adapter(name, LNTuningConfig(target_modules=targets))
        with torch.no_grad():
            for mod_name, mod in model.named_modules():
                if hasattr(mod, "ln_tuning_layers") and name in mod.ln_tuning_layers:
                    key = mod_name.removeprefix("base_model.model.") + ".weight"
                    mod.ln_tuning_layers[name].weight.copy_(gains[key])
    model.eval()
    return model


@torch.inference_mode()
def peft_generate(model, base, prompts, gen_tokens):
    t = time.perf_counter()
    outs = []
    for i, p in enumerate(prompts):
        model.set_adapter(f"user{i}")
        ids = torch.tensor([[base.tokenizer.bos_id] + base.tokenizer.encode(p)])
        out = model.generate(input_ids=ids, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    return time.perf_counter() - t, outs


@torch.inference_mode()
def peft_score(model, base, texts):
    t = time.perf_counter()
    res = []
    for i, text in enumerate(texts):
        model.set_adapter(f"user{i}")
        ids = torch.tensor([[base.tokenizer.bos_id] + base.tokenizer.encode(text)])
        logits = model(input_ids=ids).logits[0, :-1]
        res.append(torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None]).sum().item())
    return time.perf_counter() - t, res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--score-chars", type=int, default=600)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = load_base(args.base)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    files = adapter_files(base, N, work / "adapters")
    users = [f"user{i}" for i in range(N)]
    prompts, texts = snippets(N, 120, seed=1), snippets(N, args.score_chars, seed=2)
    # --max-rows-per-user N: the `single` condition's one user may fill the batch (the default is half of it)
    server = ServerProcess(args.base, work / "store", args.port, "--max-batch", str(N), "--batch-window-ms", "50",
                           "--max-rows-per-user", str(N))
    res = {k: [] for k in ("gen_mixed", "gen_single", "gen_peft", "score_mixed", "score_single", "score_peft")}
    tok = {}
    with server:
        tokens = create_users(server.url, users)
        for u, data in zip(users, files):
            upload(server.url, u, tokens[u], data)
        peft = peft_model(base, files)
        gen = lambda who: [("/v1/completions", {"prompt": p, "max_tokens": args.gen_tokens, "temperature": 0},
                            tokens[who(i)]) for i, p in enumerate(prompts)]
        sco = lambda who: [("/v1/score", {"text": t}, tokens[who(i)]) for i, t in enumerate(texts)]
        fire(server.url, gen(lambda i: users[i])[:2])  # warm-up (loads every code path once)
        for r in range(args.rounds):
            for kind, calls in (("mixed", lambda i: users[i]), ("single", lambda i: users[0])):
                wall, out = fire(server.url, gen(calls))
                res[f"gen_{kind}"].append(sum(o["usage"]["completion_tokens"] for o in out) / wall)
                wall, out = fire(server.url, sco(calls))
                res[f"score_{kind}"].append(sum(o["tokens"] for o in out) / wall)
                tok[kind] = out
            wall, _ = peft_generate(peft, base, prompts, args.gen_tokens)
            res["gen_peft"].append(N * args.gen_tokens / wall)
            wall, peft_scores = peft_score(peft, base, texts)
            res["score_peft"].append(sum(o["tokens"] for o in tok["mixed"]) / wall)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()), flush=True)
    agree = max(abs(o["logprob"] - s) for o, s in zip(tok["mixed"], peft_scores))
    best = {k: max(v) for k, v in res.items()}
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": MACHINE, "base": base.name, "requests": N,
        "gen_tokens": args.gen_tokens, "score_tokens_per_request": sum(o["tokens"] for o in tok["mixed"]) / N,
        "rounds": args.rounds, "tokens_per_s_best": best, "tokens_per_s_all": res,
        "gen_mixed_over_single": best["gen_mixed"] / best["gen_single"],
        "gen_mixed_over_peft": best["gen_mixed"] / best["gen_peft"],
        "score_mixed_over_single": best["score_mixed"] / best["score_single"],
        "score_mixed_over_peft": best["score_mixed"] / best["score_peft"],
        "max_abs_logprob_diff_server_vs_peft": agree,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
