"""sharedllm demo: the main job on the embedded default base, with no arguments.

A built-in "programmer" (Python's own json + email packages) is personalised with norm-only, LoRA-r4 and full
fine-tuning at the same short budget, each at the lr the project recommends for the base (sharedllm.recipes: the
lr_sensitivity bet's dev-chosen lrs), beside norm-only at the research catalogue's lr 5e-5; the table shows each
row's recipe and lr, held-out personal ppl, the general-text cost (ppl on the embedded general text, vs the base),
bytes and time.
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
from ..recipes import recipe_lr
from ..train import TrainConfig
from .args import add_base_args

HELP = ("personalise a built-in user on the embedded default base: norm-only vs LoRA-r4 vs full at the recommended "
        "lrs, and norm-only at the catalogue's, one table")
METHODS = ["norm", "lora", "full"]
ROWS = [("norm", "catalogue"), *((m, "recommended") for m in METHODS)]  # (method, recipe), in table order


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
    start = time.perf_counter()
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
    notes = {}
    for method, name in ROWS:
        recipe = recipe_lr(method, base.name, name)
        notes[recipe.name] = recipe.note
        say(f"training {method} for {args.steps} steps (batch 2 x 256, AdamW lr {recipe.lr:g}: {recipe.name})")
        t = time.perf_counter()
        adapted = personalise(base, train, method, TrainConfig(steps=args.steps, lr=recipe.lr),
                              label=f"demo {method} ({recipe.name})")
        stem = method if recipe.name == "recommended" else f"{method}-{recipe.name}"
        path = save_adapted(adapted, out_dir / f"{stem}.safetensors", base)
        say(f"evaluating {method} ({recipe.name})")
        rows.append({**_row(method, score(adapted.model), adapted.n_params, path.stat().st_size,
                            time.perf_counter() - t, adapted.result.steps), "recipe": recipe.name, "lr": recipe.lr})
        del adapted
    for row in rows:
        row["personal_vs_base"] = row["personal_ppl"] / rows[0]["personal_ppl"]
        row["general_vs_base"] = row["general_ppl"] / rows[0]["general_ppl"]
    return {"user": label, "base": base.name, "base_fingerprint": base.fingerprint, "steps": args.steps,
            "window": 256, "eval_tokens": rows[0]["eval_tokens"], "general_tokens": rows[0]["general_tokens"],
            "recipes": notes, "adapters": str(out_dir), "rows": rows, "wall_s": round(time.perf_counter() - start, 1)}


def _row(name, scores, params, size, wall, steps) -> dict:
    return {"method": name, "recipe": "-", "lr": 0.0, "personal_ppl": scores["personal"]["ppl"],
            "general_ppl": scores["general"]["ppl"], "eval_tokens": scores["personal"]["tokens"],
            "general_tokens": scores["general"]["tokens"], "params": params, "bytes": size,
            "wall_s": round(wall, 1), "steps": steps}


def render(r: dict) -> str:
    head = (f"user: {r['user']}  |  base: {r['base']}  |  {r['steps']} steps each, batch 2 x 256, AdamW  |  token "
            f"ppl over {r['eval_tokens']} held-out personal tokens and {r['general_tokens']} general-text tokens, "
            f"{r['window']}-token windows")
    lines = [head, "", f"{'method':18s} {'recipe':>11s} {'lr':>7s} {'personal ppl':>12s} {'vs base':>8s} "
             f"{'general ppl':>11s} {'vs base':>8s} {'params':>12s} {'bytes':>13s} {'time s':>7s}"]
    for row in r["rows"]:
        lr = f"{row['lr']:g}" if row["lr"] else "-"
        lines.append(f"{row['method']:18s} {row['recipe']:>11s} {lr:>7s} {row['personal_ppl']:12.3f} "
                     f"{_change(row['personal_vs_base']):>8s} {row['general_ppl']:11.3f} "
                     f"{_change(row['general_vs_base']):>8s} {row['params']:12,d} {row['bytes']:13,d} "
                     f"{row['wall_s']:7.1f}")
    lines.append("")
    lines += [f"{name}: {note}" for name, note in r["recipes"].items()]
    lines.append("general ppl: the embedded Wikipedia text (sharedllm/texts/general_en.txt), never trained on: what "
                 "each adapter costs outside the user's own text")
    lines.append(f"adapters written to {r['adapters']}  |  wall time {r['wall_s']:.0f} s")
    return "\n".join(lines)


def _change(ratio: float) -> str:
    return "-" if ratio == 1 else f"{100 * (ratio - 1):+.1f} %"
