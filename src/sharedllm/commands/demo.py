"""sharedllm demo: the main job on the embedded default base, with no arguments.

A built-in "programmer" (Python's own json + email packages) is personalised with norm-only, LoRA-r4 and full
fine-tuning at the same short budget; the table shows held-out personal ppl, general-text ppl, bytes and time.
"""
from __future__ import annotations

import sysconfig
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from ..base import load_base
from ..data import split_by_position
from ..log import say
from ..personalise import evaluate_on, personalise, save_adapted
from ..train import TrainConfig
from .args import add_base_args

HELP = "personalise a built-in user on the embedded default base: norm-only vs LoRA-r4 vs full, one table"
METHODS = ["norm", "lora", "full"]


def configure(p) -> None:
    add_base_args(p)
    p.add_argument("--steps", type=int, default=30, help="training steps per method (same budget for all)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored per text")
    p.add_argument("--out-dir", default=None, help="keep the adapters here (default: a temporary folder)")


def programmer_text() -> tuple[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))
    return "Python stdlib json + email source", "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def general_text() -> str:
    return resources.files("sharedllm").joinpath("texts/general_en.txt").read_text(encoding="utf-8")


def run(args) -> dict:
    say(f"loading base {args.base} (first run converts the embedded GGUF once)")
    base = load_base(args.base, args.device)
    label, text = programmer_text()
    enc = lambda s: torch.tensor(base.tokenizer.encode(s))  # noqa: E731
    train, held = (enc(s) for s in split_by_position(text))
    general = enc(general_text())
    say(f"user: {label}: {len(train)} training tokens, last 20 % held out ({len(held)} tokens)")
    score = lambda m: {"personal": evaluate_on(m, base, held, 256, args.eval_tokens),  # noqa: E731
                       "general": evaluate_on(m, base, general, 256, args.eval_tokens)}
    rows = [_row("base (no adapter)", score(base.model), 0, 0, 0.0, 0)]
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="sharedllm-demo-"))
    for method in METHODS:
        say(f"training {method} for {args.steps} steps (batch 2 x 256, AdamW lr 5e-5)")
        t = time.perf_counter()
        adapted = personalise(base, train, method, TrainConfig(steps=args.steps), label=f"demo {method}")
        path = save_adapted(adapted, out_dir / f"{method}.safetensors", base)
        say(f"evaluating {method}")
        rows.append(_row(method, score(adapted.model), adapted.n_params, path.stat().st_size,
                         time.perf_counter() - t, adapted.result.steps))
        del adapted
    return {"user": label, "base": base.name, "base_fingerprint": base.fingerprint, "steps": args.steps,
            "window": 256, "eval_tokens": rows[0]["eval_tokens"], "adapters": str(out_dir), "rows": rows}


def _row(name, scores, params, size, wall, steps) -> dict:
    return {"method": name, "personal_ppl": scores["personal"]["ppl"], "general_ppl": scores["general"]["ppl"],
            "eval_tokens": scores["personal"]["tokens"], "params": params, "bytes": size, "wall_s": round(wall, 1),
            "steps": steps}


def render(r: dict) -> str:
    head = (f"user: {r['user']}  |  base: {r['base']}  |  {r['steps']} steps each  |  token ppl over "
            f"{r['eval_tokens']} held-out tokens in {r['window']}-token windows")
    lines = [head, "", f"{'method':20s} {'personal ppl':>12s} {'general ppl':>12s} {'params':>12s} "
             f"{'bytes':>13s} {'time s':>8s}"]
    for row in r["rows"]:
        lines.append(f"{row['method']:20s} {row['personal_ppl']:12.3f} {row['general_ppl']:12.3f} "
                     f"{row['params']:12,d} {row['bytes']:13,d} {row['wall_s']:8.1f}")
    lines.append(f"\nadapters written to {r['adapters']}")
    return "\n".join(lines)
