"""sharedllm adapt --method auto: for one user, train each candidate format, score each on the dev slice (the
training pool's last 10 %), ship the smallest within --tolerance of the best that beats the base
(sharedllm.choose.choose_format); the table and the rule go into the file's metadata (`choice`) and are printed.
When no candidate beats the base no file is written and the command exits 1."""
from __future__ import annotations

from pathlib import Path

from ..errors import SharedLLMError
from ..log import say

AUTO_ONLY = ("candidates", "tolerance", "dev_fraction")


def add_auto_args(p) -> None:
    g = p.add_argument_group("--method auto (one user): train each candidate format, ship the smallest good one")
    g.add_argument("--candidates", default=None,
                   help="formats to try, comma-separated METHOD[-rR][+SCHEME] (default norm,ia3,lora-r4; e.g. "
                        "lora-r4+int4-g64 is that LoRA compressed to 4 bits, trained once with lora-r4)")
    g.add_argument("--tolerance", type=float, default=None,
                   help="ship the smallest candidate whose dev ppl is within this fraction of the best (default "
                        "0.02 = 2 %%) and below the base's")
    g.add_argument("--dev-fraction", type=float, default=None,
                   help="the dev slice: this last fraction of the training pool (default 0.1); the held-out 20 %% "
                        "is never used to choose")


def auto_requested(args) -> bool:
    """True for --method auto; refuses the auto-only options without it."""
    if args.method == "auto":
        return True
    given = [k for k in AUTO_ONLY if getattr(args, k, None) is not None]
    if given:
        raise SharedLLMError(f"--{given[0].replace('_', '-')} applies to --method auto only")
    return False


def run_auto(args) -> dict:
    from ..atomic import write_bytes_atomic
    from ..base import load_base
    from ..choose import DEFAULT_CANDIDATES, DEV_FRACTION, choose_format, parse_candidates
    from ..data import load_user
    from ..personalise import evaluate_on
    from ..rule import TOLERANCE, check_tolerance
    from ..train import TrainConfig, autocast

    fleet = [k for k in ("manifest", "out_dir", "ray", "ray_address", "store") if getattr(args, k, None)]
    if fleet or len(args.text) != 1 or not args.out:
        raise SharedLLMError("--method auto chooses for one user: give one --text PATH and --out FILE"
                             + (f" (not --{fleet[0].replace('_', '-')})" if fleet else ""))
    given = sorted(k for k, v in vars(args).items() if k.startswith("method_") and v is not None)
    if given:
        raise SharedLLMError("--method auto takes each candidate's config in --candidates (e.g. lora-r8), not "
                             f"--{given[0].removeprefix('method_').replace('_', '-')}")
    if args.lr is not None and args.recipe is not None:
        raise SharedLLMError(f"give --lr or --recipe, not both (--lr {args.lr:g} --recipe {args.recipe})")
    candidates = args.candidates or ",".join(DEFAULT_CANDIDATES)
    parse_candidates(candidates)  # refuse a bad list before loading anything
    tolerance = check_tolerance(TOLERANCE if args.tolerance is None else args.tolerance)
    text = args.text[0]
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, seed=args.seed, budget_s=args.budget_s)
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    user = load_user(text, base.tokenizer).check(cfg.seq, args.window)
    fraction = DEV_FRACTION if args.dev_fraction is None else args.dev_fraction
    say(f"{user.source}: choosing among {candidates} on the training pool's last {100 * fraction:g} % (dev), "
        f"tolerance {100 * tolerance:g} %")
    cap = args.eval_tokens or None
    choice = choose_format(base, user.train, candidates, tolerance, cfg, args.window, cap, fraction, lr=args.lr,
                           recipe=args.recipe or "recommended", dtype=args.dtype, info={"user_text": Path(text).name})
    out = {"method": "auto", "chosen": choice.table["chosen"], "choice": choice.table, "base": base.name,
           "base_fingerprint": base.fingerprint, "out": None, "ok": choice.data is not None}
    if choice.data is not None:
        write_bytes_atomic(args.out, choice.data)
        with autocast(args.dtype, base.device):  # the held-out 20 %: reported here, never used to choose
            before = evaluate_on(base.model, base, user.heldout, args.window, cap)
            after = evaluate_on(choice.adapted.model, base, user.heldout, args.window, cap)
        out.update(out=str(args.out), bytes=len(choice.data), params=choice.adapted.n_params,
                   heldout_ppl_before=before["ppl"], heldout_ppl_after=after["ppl"], eval_tokens=after["tokens"])
    return out


def render_auto(r: dict) -> str:
    from ..choose import render_table

    lines = [render_table(r["choice"])]
    if r["out"]:
        lines += [f"adapter  {r['out']}  ({r['chosen']}, {r['params']:,} params, {r['bytes']:,} bytes with the "
                  "choice recorded)",
                  f"held-out token ppl (reported, not used to choose; {r['eval_tokens']} tokens): "
                  f"{r['heldout_ppl_before']:.3f} -> {r['heldout_ppl_after']:.3f}"]
    return "\n".join(lines)
