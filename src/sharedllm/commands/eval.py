"""sharedllm eval: held-out perplexity and bits/byte of a user's text, with or without an adapter."""
from __future__ import annotations

from ..base import load_base
from ..data import load_user
from ..log import say
from ..personalise import evaluate_on, load_adapted
from .args import add_base_args, add_eval_args

HELP = "held-out token ppl and bits/byte of a text (the last 20 %), optionally under an adapter"


def configure(p) -> None:
    p.add_argument("--text", required=True, help="a UTF-8 file or folder; its last 20 %% is scored")
    p.add_argument("--adapter", default=None, help="adapter file to apply")
    add_base_args(p)
    add_eval_args(p)


def run(args) -> dict:
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    model = base.model
    if args.adapter:
        model = load_adapted(base, args.adapter).model
    user = load_user(args.text, base.tokenizer).check(1, args.window)
    r = evaluate_on(model, base, user.heldout, args.window, args.eval_tokens or None)
    return {"ppl": r["ppl"], "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"], "window": r["window"],
            "adapter": args.adapter, "base": base.name, "base_fingerprint": base.fingerprint}


def render(r: dict) -> str:
    under = f"adapter {r['adapter']}" if r["adapter"] else "no adapter"
    return (f"held-out token ppl {r['ppl']:.3f}, bits/byte {r['bits_per_byte']:.4f} "
            f"({r['tokens']} tokens, {r['window']}-token windows, {under}, base {r['base']})")
