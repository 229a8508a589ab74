"""lm-evaluation-harness against a user's adapter through `sharedllm serve`, checked against lm-eval's own HF model
on the merged checkpoint of the same adapter (issue 33 item 3).

    pip install -e ".[eval]"
    PYTHONPATH=src python bench/lm_eval_api.py --adapter ann.safetensors [--limit 40] [--out /tmp/lm_eval_api]

1. `sharedllm export --adapter A --out OUT/merged` (a norm adapter: a merged HF checkpoint);
2. `sharedllm serve --base default` on a fresh store, a user, the adapter uploaded;
3. `lm_eval --model local-completions` (the user's token as OPENAI_API_KEY; tokenized requests with the base's own
   HF tokenizer, so both sides see the same token ids) on the local tasks in experiments/lm_eval/ (a loglikelihood
   multiple-choice task and a generate_until task);
4. `lm_eval --model hf --model_args pretrained=OUT/merged,dtype=float32` on the same tasks;
5. per request: the loglikelihood of each choice through the API minus the HF model's, in nats and in nats per
   continuation token, and whether the greedy generations are the same strings. Exit status 1 when a difference is
   over --tol nats per token (default 1e-4, the bar for /v1/completions logprobs) or a generation differs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx

from machine import cpu_info, load_average
from serve_common import ServerProcess, auth, create_users, upload

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "experiments" / "lm_eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_eval(model: str, model_args: str, tasks: str, out: Path, limit: int | None, env: dict) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(TASKS), "--output_path", str(out), "--log_samples", "--batch_size", "1"]
    if model == "hf":
        cmd += ["--device", "cpu"]
    if limit:
        cmd += ["--limit", str(limit)]
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    run = subprocess.run(cmd, env={**os.environ, **OFFLINE, **env}, capture_output=True, text=True)
    took = time.monotonic() - t
    if run.returncode != 0:
        sys.exit(f"lm_eval --model {model} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return run.stdout, took


def samples(out: Path, task: str) -> dict[int, dict]:
    files = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    if not files:
        sys.exit(f"no samples for {task} under {out}")
    rows = [json.loads(line) for line in Path(max(files, key=os.path.getmtime)).read_text().splitlines()]
    return {r["doc_id"]: r for r in rows}


def compare(api_out: Path, hf_out: Path, tokenizer) -> dict:
    """Per choice: API minus HF loglikelihood; per generation: equal strings."""
    api, hf = samples(api_out, "austen_next"), samples(hf_out, "austen_next")
    worst = worst_tok = 0.0
    greedy_same, n = True, 0
    for doc_id, a in api.items():
        h = hf[doc_id]
        args = a["arguments"].values() if isinstance(a["arguments"], dict) else a["arguments"]  # 0.4.x: a dict
        for arg, (la, ga), (lh, gh) in zip(args, a["filtered_resps"], h["filtered_resps"]):
            cont = arg["arg_1"] if isinstance(arg, dict) else arg[1]
            tokens = max(1, len(tokenizer(cont, add_special_tokens=False).input_ids))
            d = abs(float(la) - float(lh))
            worst, worst_tok, n = max(worst, d), max(worst_tok, d / tokens), n + 1
            greedy_same &= ga == gh
    api_g, hf_g = samples(api_out, "austen_complete"), samples(hf_out, "austen_complete")
    gen_diff = [i for i in api_g if api_g[i]["resps"][0][0] != hf_g[i]["resps"][0][0]]
    return {"loglikelihoods": n, "max_abs_diff_nats": worst, "max_diff_nats_per_token": worst_tok,
            "is_greedy_same": greedy_same, "generations": len(api_g), "generations_differing": gen_diff}


def metrics(out: Path) -> dict:
    files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    res = json.loads(Path(max(files, key=os.path.getmtime)).read_text())["results"]
    return {task: {k: v for k, v in m.items() if k not in ("alias", "name") and not k.endswith("_stderr,none")}
            for task, m in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="a norm adapter of the default base (sharedllm adapt)")
    ap.add_argument("--out", default="/tmp/lm_eval_api", help="working folder (must not exist)")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--tol", type=float, default=1e-4, help="nats per continuation token")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True)
    merged = out / "merged"
    subprocess.run([sys.executable, "-m", "sharedllm.cli", "-q", "export", "--adapter", args.adapter,
                    "--out", str(merged)], check=True)
    from transformers import AutoTokenizer

    from sharedllm.base import default_base_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_base_dir()))
    tasks = "austen_next,austen_complete"
    srv = ServerProcess("default", out / "store", args.port or free_port()).start()
    try:
        token = create_users(srv.url, ["ann"])["ann"]
        upload(srv.url, "ann", token, Path(args.adapter).read_bytes())
        model_args = (f"model=sharedllm,base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={default_base_dir()},tokenized_requests=True,max_length=2048")
        api_text, api_s = lm_eval("local-completions", model_args, tasks, out / "api", args.limit,
                                  {"OPENAI_API_KEY": token})
        health = httpx.get(f"{srv.url}/health", headers=auth(token), timeout=30).json()
    finally:
        srv.stop()
    hf_text, hf_s = lm_eval("hf", f"pretrained={merged},dtype=float32", tasks, out / "hf", args.limit, {})
    print("---- lm_eval --model local-completions (sharedllm serve, user ann's adapter) ----")
    print(api_text[api_text.find("|"):].strip() if "|" in api_text else api_text)
    print("---- lm_eval --model hf (the merged checkpoint of the same adapter) ----")
    print(hf_text[hf_text.find("|"):].strip() if "|" in hf_text else hf_text)
    diff = compare(out / "api", out / "hf", tokenizer)
    report = {"date": date.today().isoformat(), "machine": {**cpu_info(), "load_average": load_average()},
              "adapter": args.adapter, "limit": args.limit, "api_s": round(api_s, 1), "hf_s": round(hf_s, 1),
              "server": {k: health.get(k) for k in ("decode", "batches", "rows", "decode_steps")},
              "metrics_api": metrics(out / "api"), "metrics_hf": metrics(out / "hf"), **diff, "tol": args.tol}
    print(json.dumps(report, indent=1))
    ok = diff["max_diff_nats_per_token"] <= args.tol and not diff["generations_differing"] and diff["is_greedy_same"]
    print(f"API vs hf: max |loglikelihood difference| {diff['max_abs_diff_nats']:.3g} nats "
          f"({diff['max_diff_nats_per_token']:.3g} per token, tolerance {args.tol:g}) over "
          f"{diff['loglikelihoods']} loglikelihoods; {len(diff['generations_differing'])} of {diff['generations']} "
          f"greedy generations differ: {'OK' if ok else 'OVER'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
