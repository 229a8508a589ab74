"""LoRA rows through the real server, side by side in one run (issue 30 item 5): 16 concurrent requests from 16 users
(32-token prompts, --max-tokens new tokens, greedy) through one `sharedllm serve`, each user with

  norm   their own norm adapter
  lora   their own LoRA (rank 4 on all seven projections unless the files say otherwise)
  base   no adapter (`"adapter": "none"` in the request body)

and the same 16 LoRA users against llama.cpp's `llama-server -np 16` (when --llama-server names the binary), given
the same 16 LoRAs as GGUF (`--lora F1,...,F16`, `--lora-init-without-apply`, each request's `lora` naming its own id
with scale 1) on an F32 GGUF of the same base weights, plus its base rows (no LoRA) for reference. Rounds are
interleaved (every condition once per round); the table is the median per condition. Prints aggregate tok/s,
the servers' CPU seconds per generated token, the ratios LoRA/norm, LoRA/base and sharedllm/llama-server, and how
many greedy tokens of each LoRA user (and of each base row) the two servers agree on.

Adapters: --lora-dir / --norm-dir folders of `sharedllm adapt --out-dir` files (the first --users of each, sorted by
name), else seeded synthetic ones (norm: base gains x (1 + 0.05 noise); LoRA: a fresh adapter with A and B
perturbed by seeded noise), saved with `sharedllm.personalise.save_adapted` exactly as the CLI saves.

The llama.cpp side is built from what --llama-cpp points at (a llama.cpp source tree, for its convert scripts):
the base's HF folder is copied (config.json gets `architectures`, which convert needs), converted to an F32 GGUF
with convert_hf_to_gguf.py (it needs the `sentencepiece` module importable), and each LoRA goes through
`sharedllm export`'s code path (a PEFT folder) -> convert_lora_to_gguf.py --outtype f32. Converted files are cached
in --work by the adapter's sha256.

    PYTHONPATH=src python bench/serve_lora.py --lora-dir D1 --norm-dir D2 \\
        --llama-server /work/build/lcpp/bin/llama-server --llama-cpp LLAMA_CPP_SRC [--rounds 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from sharedllm.base import cache_dir, load_base
from sharedllm.personalise import new_adapter, save_adapted

from machine import describe
from serve_common import ServerProcess, adapter_files, create_users, fire, snippets, upload

ROOT = Path(__file__).resolve().parents[1]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its finished children so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def synthetic_loras(base, n: int, out: Path, scale: float = 0.02, seed0: int = 0) -> list[Path]:
    """n LoRA adapters: a fresh adapter (seeded A, zero B) with A and B perturbed by seeded noise."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = new_adapter(base, "lora", seed=seed0 + i)
        g = torch.Generator().manual_seed(1000 + seed0 + i)
        with torch.no_grad():
            for name, p in a.params.items():
                noise = torch.randn(p.shape, generator=g)
                p.add_(noise * (scale if "lora_B" in name else p.abs().mean().item()))
        paths.append(save_adapted(a, out / f"lora{i}.safetensors", base))
    return paths


def synthetic_norms(base, n: int, out: Path) -> list[Path]:
    """serve_common's n norm adapters (base gains x (1 + 0.05 noise), seeded), as files."""
    adapter_files(base, n, out)
    return [out / f"user{i}.safetensors" for i in range(n)]


def adapters_from(folder: str | None, n: int, make) -> list[Path]:
    if folder:
        paths = sorted(Path(folder).glob("*.safetensors"))[:n]
        if len(paths) < n:
            raise SystemExit(f"{folder}: {len(paths)} adapters, need {n}")
        return paths
    return make()


def prompts_of(tok, n: int, tokens: int) -> list[tuple[str, list[int]]]:
    """n (text, ids) pairs from the shared corpora whose text the server tokenises to exactly `tokens` ids (its BOS
    included): the text is a decoded run of tokens - 1 ids that encodes back to the same ids."""
    out = []
    for text in snippets(4 * n, 600, seed=3):
        ids = tok.encode(text)
        for start in range(0, len(ids) - tokens, 3):
            sub = ids[start: start + tokens - 1]
            piece = tok.hf.decode(sub)
            if tok.encode(piece) == sub and piece.strip() == piece:
                out.append((piece, [tok.bos_id, *sub] if tok.bos_id is not None else sub))
                break
        if len(out) == n:
            return out
    raise SystemExit("not enough prompts that tokenise back to themselves")


# ---- llama.cpp side ------------------------------------------------------------------------------------------------
def hf_copy(base_dir: Path, work: Path) -> Path:
    """The base's HF folder with `architectures` in config.json (convert_*_to_gguf.py need it); weights linked."""
    out = work / "base-hf"
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg.setdefault("architectures", ["LlamaForCausalLM"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def run_quiet(cmd: list, what: str) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def base_gguf(args, hf: Path, work: Path) -> Path:
    out = work / "base-f32.gguf"
    if not out.exists():
        print("converting the base to an F32 GGUF", flush=True)
        run_quiet([sys.executable, Path(args.llama_cpp) / "convert_hf_to_gguf.py", hf, "--outtype", "f32",
                   "--outfile", f"{out}.part"], "convert_hf_to_gguf.py")
        os.rename(f"{out}.part", out)
    return out


CONVERT_MANY = """import os, runpy, sys
script, base, *jobs = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # its `conversion` package, as `python script` has
for peft, out in zip(jobs[::2], jobs[1::2]):
    sys.argv = [script, peft, "--base", base, "--outtype", "f32", "--outfile", out]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
"""


def lora_ggufs(args, base, adapters: list[Path], hf: Path, work: Path) -> list[Path]:
    """Each LoRA file -> a PEFT folder (`sharedllm export`'s code path, in this process: load_adapted then PEFT's
    save_pretrained) -> convert_lora_to_gguf.py --outtype f32 (all in one converter process, so torch and
    transformers are imported once); cached by the adapter file's sha256."""
    from sharedllm.personalise import load_adapted

    outs, jobs = [], []
    for adapter in adapters:
        sha = hashlib.sha256(adapter.read_bytes()).hexdigest()[:16]
        out, peft = work / "lora-gguf" / f"{sha}.gguf", work / "peft" / sha
        outs.append(out)
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if not (peft / "adapter_config.json").exists():
            shutil.rmtree(peft, ignore_errors=True)
            load_adapted(base, adapter).model.save_pretrained(str(peft), safe_serialization=True)
        jobs += [peft, f"{out}.part"]
    if jobs:
        print(f"converting {len(jobs) // 2} LoRAs to GGUF", flush=True)
        run_quiet([sys.executable, "-c", CONVERT_MANY, Path(args.llama_cpp) / "convert_lora_to_gguf.py", hf, *jobs],
                  "convert_lora_to_gguf.py")
        for part in jobs[1::2]:
            os.rename(part, part[: -len(".part")])
    return outs


class LlamaServer:
    def __init__(self, binary: str, model: Path, loras: list[Path], port: int, threads: int, slots: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [binary, "-m", str(model), "--port", str(port), "-t", str(threads), "-tb", str(threads),
                    "-np", str(slots), "-c", str(slots * 512), "--no-webui", "--lora-init-without-apply",
                    "--lora", ",".join(str(f) for f in loras)]  # this llama.cpp keeps only the last of repeated --lora
        self.log, self.proc = log, None

    def start(self, timeout: float = 300) -> "LlamaServer":
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


# ---- measurement ---------------------------------------------------------------------------------------------------
def measure(url: str, pid: int, calls: list, count) -> dict:
    """The calls at once; aggregate tok/s over the wall time, and the server's CPU seconds per generated token."""
    cpu0 = proc_cpu_s(pid)
    wall, replies = fire(url, calls)
    cpu = proc_cpu_s(pid) - cpu0
    made = [count(r) for r in replies]
    n = sum(made)
    return {"wall_s": wall, "tokens": n, "tok_s": n / wall, "cpu_s": cpu, "cpu_ms_per_token": 1000 * cpu / n,
            "min_tokens": min(made), "replies": replies}


def matched(tok, ids: list[int], text: str) -> int:
    """How many leading tokens of `ids` (llama.cpp's greedy tokens) decode to a prefix of `text` (sharedllm's)."""
    k = 0
    for j in range(1, len(ids) + 1):
        piece = tok.hf.decode(ids[:j])
        if piece.endswith("\ufffd"):  # a character split over tokens: judge it when complete
            continue
        if not text.startswith(piece):
            break
        k = j
    return k


def py_spy(args, pid: int, seconds: float, out: Path) -> threading.Thread:
    """py-spy (native frames included) on the sharedllm server for `seconds`, collapsed stacks to `out`."""
    cmd = [args.py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50", "--native", "--format", "raw",
           "-o", str(out), "--nonblocking"]
    t = threading.Thread(target=subprocess.run, args=(cmd,), kwargs={"capture_output": True})
    t.start()
    return t


def summarise_profile(path: Path, top: int = 25) -> dict:
    """Collapsed stacks -> share of samples by leaf frame, and by a few named parts of the decode step."""
    leaves, parts, total = {}, {}, 0
    marks = {"lora kernel (LoraRows.linear)": "linear (sharedllm/adapters/lora.py", "row batch build": "RowBatch",
             "lean decode step": "step (sharedllm/serve/fastdecode.py", "prefill (HF forward)": "prefill",
             "sampling": "sample", "idle / waiting": "wait (threading.py"}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        leaf = stack.split(";")[-1]
        leaves[leaf] = leaves.get(leaf, 0) + n
        for name, mark in marks.items():
            if mark in stack:
                parts[name] = parts.get(name, 0) + n
    share = lambda d: {k: round(v / total, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}  # noqa
    return {"samples": total, "parts": share(parts), "leaves": share(leaves)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="default")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8830)
    ap.add_argument("--lora-dir", default=None, help="LoRA adapters (sharedllm adapt --method lora --out-dir)")
    ap.add_argument("--norm-dir", default=None, help="norm adapters (sharedllm adapt --method norm --out-dir)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (else sharedllm only)")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp source tree (its convert_*_to_gguf.py scripts)")
    ap.add_argument("--base-dir", default=None, help="the base's HF folder (default: the cached converted base)")
    ap.add_argument("--work", default=None, help="folder for stores, logs and converted GGUFs (default: a temp dir)")
    ap.add_argument("--serve-args", default="", help="extra `sharedllm serve` arguments, space-separated")
    ap.add_argument("--py-spy", default=None, help="py-spy binary: profile the sharedllm server over one extra "
                                                   "LoRA run after the rounds")
    ap.add_argument("--out", default=None, help="write the report (JSON) here too")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it
    torch.set_num_threads(args.threads)
    n = args.users
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base)
    tok = base.tokenizer
    norms = adapters_from(args.norm_dir, n, lambda: synthetic_norms(base, n, work / "norm"))
    loras = adapters_from(args.lora_dir, n, lambda: synthetic_loras(base, n, work / "lora"))
    prompts = prompts_of(tok, n, args.prompt_tokens)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": describe(), "base": base.name,
              "command": " ".join(sys.argv), "args": vars(args), "torch": torch.__version__, "commit": subprocess.run(
                  ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
              "src_modified": subprocess.run(["git", "-C", str(ROOT), "status", "--short", "--", "src"],
                                             capture_output=True, text=True).stdout.split("\n")[:-1],
              "adapters": {"norm": [p.name for p in norms], "lora": [p.name for p in loras]}}
    print(json.dumps({k: report[k] for k in ("date", "machine", "base", "command")}), flush=True)

    llama = None
    if args.llama_server:
        hf = hf_copy(Path(args.base_dir) if args.base_dir else cache_dir() / base.name, work)
        model = base_gguf(args, hf, work)
        llama = LlamaServer(args.llama_server, model, lora_ggufs(args, base, loras, hf, work), args.port + 1, args.threads, n,
                            work / "llama-server.log")
    shutil.rmtree(work / "store", ignore_errors=True)  # a fresh store: the users are created anew each run
    srv = ServerProcess(args.base, work / "store", args.port, "--max-batch", str(n),
                        *[a for a in args.serve_args.split() if a], log=work / "sharedllm-serve.log")
    try:
        srv.start()
        names = [f"norm{i}" for i in range(n)] + [f"lora{i}" for i in range(n)]
        tokens = create_users(srv.url, names)
        for i in range(n):
            upload(srv.url, f"norm{i}", tokens[f"norm{i}"], norms[i].read_bytes())
            upload(srv.url, f"lora{i}", tokens[f"lora{i}"], loras[i].read_bytes())
        if llama:
            llama.start()
            loaded = httpx.get(f"{llama.url}/lora-adapters", timeout=10).json()
            assert len(loaded) == n, loaded  # (their listed scale stays 1.0 under --lora-init-without-apply)
        # ignore_eos on both servers: every row generates exactly --max-tokens tokens, so a condition's batch does
        # not shrink when some users' greedy text happens to end early (an unequal workload, not a speed)
        gen = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
        ours = lambda r: r["usage"]["completion_tokens"]  # noqa: E731
        theirs = lambda r: r["tokens_predicted"]  # noqa: E731
        conds = {
            "sharedllm norm": (srv, [("/v1/completions", {"prompt": p, **gen}, tokens[f"norm{i}"])
                                     for i, (p, _) in enumerate(prompts)], ours),
            "sharedllm lora": (srv, [("/v1/completions", {"prompt": p, **gen}, tokens[f"lora{i}"])
                                     for i, (p, _) in enumerate(prompts)], ours),
            "sharedllm base": (srv, [("/v1/completions", {"prompt": p, **gen, "adapter": "none"},
                                      tokens[f"norm{i}"]) for i, (p, _) in enumerate(prompts)], ours),
        }
        if llama:
            body = {"n_predict": args.max_tokens, "temperature": 0.0, "cache_prompt": False, "return_tokens": True,
                    "ignore_eos": True}
            conds["llama-server lora"] = (llama, [("/completion", {"prompt": ids, **body, "lora": [
                {"id": i, "scale": 1.0}]}, "none") for i, (_, ids) in enumerate(prompts)], theirs)
            # a request without `lora` runs the server's global list, which is every --lora at scale 1 here
            # (--lora-init-without-apply leaves the listed scales at 1): base rows name one LoRA at scale 0
            conds["llama-server base"] = (llama, [("/completion", {"prompt": ids, **body, "lora": [
                {"id": 0, "scale": 0.0}]}, "none")
                                                  for i, (_, ids) in enumerate(prompts)], theirs)
        for name, (s, calls, _) in conds.items():  # warm every path (2 requests each)
            fire(s.url, [(p, {**b, ("n_predict" if "n_predict" in b else "max_tokens"): 4}, t)
                         for p, b, t in calls[:2]])
        runs = {name: [] for name in conds}
        first = {}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}, load average {describe().rsplit('load average ', 1)[1]}", flush=True)
            for name, (s, calls, count) in conds.items():
                m = measure(s.url, s.proc.pid, calls, count)
                first.setdefault(name, m.pop("replies"))
                runs[name].append(m)
                print(f"  {name}: {json.dumps({k: round(v, 3) for k, v in m.items()})}", flush=True)
        for name, (s, calls, count) in conds.items():
            r0 = first[name][0]
            if name.startswith("sharedllm"):
                assert r0["usage"]["prompt_tokens"] == args.prompt_tokens, r0["usage"]
            else:
                assert r0["tokens_evaluated"] == args.prompt_tokens, r0["tokens_evaluated"]
        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "cpu_ms_per_token", "wall_s", "tokens")}
               for name, rs in runs.items()}
        report["runs"], report["median"] = runs, med
        tok_s = {k: v["tok_s"] for k, v in med.items()}
        ratios = {"sharedllm lora / norm": tok_s["sharedllm lora"] / tok_s["sharedllm norm"],
                  "sharedllm lora / base": tok_s["sharedllm lora"] / tok_s["sharedllm base"],
                  "sharedllm norm / base": tok_s["sharedllm norm"] / tok_s["sharedllm base"]}
        if llama:
            cpu = {k: v["cpu_ms_per_token"] for k, v in med.items()}
            ratios |= {"sharedllm lora / llama-server lora": tok_s["sharedllm lora"] / tok_s["llama-server lora"],
                       "sharedllm base / llama-server base": tok_s["sharedllm base"] / tok_s["llama-server base"],
                       "llama-server lora / llama-server base": tok_s["llama-server lora"]
                       / tok_s["llama-server base"],
                       "tok per CPU-s, sharedllm lora / llama-server lora": cpu["llama-server lora"]
                       / cpu["sharedllm lora"]}
            agree = {}
            for who in ("lora", "base"):
                ours_r, theirs_r = first[f"sharedllm {who}"], first[f"llama-server {who}"]
                agree[who] = [{"match": matched(tok, t["tokens"], o["choices"][0]["text"]),
                               "llama_tokens": len(t["tokens"]), "sharedllm_tokens": o["usage"]["completion_tokens"]}
                              for o, t in zip(ours_r, theirs_r)]
            report["agreement"] = agree
            report["agreement_user0"] = {"lora0": agree["lora"][0], "text_sharedllm": first["sharedllm lora"][0][
                "choices"][0]["text"][:300], "text_llama": first["llama-server lora"][0]["content"][:300]}
        report["ratios"] = ratios
        report["texts"] = {name: [r["choices"][0]["text"] if "choices" in r else r["content"] for r in rs]
                           for name, rs in first.items()}  # round 1's replies
        if args.py_spy:
            name = "sharedllm lora"
            est = med[name]["wall_s"] + 2
            t = py_spy(args, srv.proc.pid, est, work / "py-spy.txt")
            time.sleep(1.0)
            measure(srv.url, srv.proc.pid, conds[name][1], conds[name][2])
            t.join()
            if (work / "py-spy.txt").exists():
                report["profile"] = summarise_profile(work / "py-spy.txt")
    finally:
        srv.stop()
        if llama:
            llama.stop()
    print("\n| condition | tok/s (median) | CPU ms / token | wall s | tokens |")
    print("|---|---:|---:|---:|---:|")
    for name, m in report["median"].items():
        print(f"| {name} | {m['tok_s']:.1f} | {m['cpu_ms_per_token']:.1f} | {m['wall_s']:.2f} | {m['tokens']:.0f} |")
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    if "agreement" in report:
        for who, rows in report["agreement"].items():
            print(f"greedy agreement ({who}): matching leading tokens per user "
                  f"{[r['match'] for r in rows]} of {[r['llama_tokens'] for r in rows]}")
    print(json.dumps(report, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
