"""sharedllm adapt: train one user's adapter (or many users' in one pass) and report held-out ppl before and after."""
from __future__ import annotations

from pathlib import Path

from .. import stack
from ..data import load_user
from ..errors import SharedLLMError
from ..log import say
from ..personalise import evaluate_on, personalise, save_adapted
from ..snapshot import beside, for_method, run_key
from ..train import DTYPES, autocast
from .args import (add_base_args, add_eval_args, add_method_args, add_train_args, load_for_training,
                   load_group, method_config, positive_int, train_config, train_recipe)

HELP = "train a per-user adapter on a text file or folder (several: one pass); report held-out ppl before and after"


def configure(p) -> None:
    p.add_argument("--text", action="append", default=[],
                   help="a user's text: a UTF-8 file or a folder of them; repeat for several users (one pass)")
    p.add_argument("--out", help="adapter file to write (.safetensors), for one --text")
    p.add_argument("--out-dir", help="folder for several users' adapters, one USER.safetensors each")
    p.add_argument("--manifest", help="users to train in one pass: lines 'USER PATH', or JSON {USER: PATH} or "
                                      "{USER: {\"text\": PATH, \"lr\": X}}")
    add_method_args(p)
    p.add_argument("--on-top", metavar="GROUP", default=None,
                   help="train on top of this group adapter (a LoRA trained on a cluster's pooled text, bound to the "
                        "base): the file written is bound to the base and to GROUP, and loads and serves with it "
                        "(a hierarchical adapter; one user or many in one pass, or on Ray; the group file is kept beside the parts)")
    add_base_args(p)
    add_train_args(p)
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="compute dtype of training and scoring: bf16 runs them under torch.autocast (gains and "
                        "optimizer state stay fp32; recorded in the adapter's metadata); faster on CPUs with AMX")
    add_eval_args(p)
    add_ray_args(p)
    from .adapt_auto import add_auto_args

    add_auto_args(p)


def add_ray_args(p) -> None:
    g = p.add_argument_group("a fleet on a Ray cluster (with --manifest / --text and --out-dir)")
    g.add_argument("--ray", action="store_true",
                   help="send the users to Ray as tasks (a local instance sized to this machine, unless "
                        "--ray-address); users whose adapter exists and verifies are skipped, a failed user is "
                        "retried and reported, the others go on")
    g.add_argument("--ray-address", default=None,
                   help="join an existing cluster instead: auto (the one `ray start` made here) or ray://HOST:10001")
    g.add_argument("--ray-workers", type=positive_int, default=None,
                   help="CPUs of the local Ray instance (default: every core of this machine)")
    g.add_argument("--fleet-size", type=positive_int, default=2,
                   help="users trained in one pass per task (default 2: the fleet's best measured CPU throughput, "
                        "docs/BENCHMARKS.md; fewer when the cluster would sit idle)")
    g.add_argument("--task-cpus", type=positive_int, default=1, help="CPUs (torch threads) per task (default 1)")
    g.add_argument("--retries", type=int, default=1,
                   help="further attempts for a user whose task failed or whose worker died (default 1)")
    g.add_argument("--store", nargs="?", const="", default=None,
                   help="also put each adapter into this server store (`sharedllm serve --store DIR`; alone: "
                        "serve's default store for the base), creating missing users")
    g.add_argument("--tokens", default=None,
                   help="where the bearer tokens of users created in the store go (default "
                        "OUT_DIR/store_tokens.jsonl, mode 0600)")
    g.add_argument("--replace", action="store_true",
                   help="replace a stored adapter of another base, method or config (default: report the user)")
    g.add_argument("--json-progress", nargs="?", const="-", default=None, metavar="FILE",
                   help="one JSON line per event (user done, retried, failed; counts and ETA) on stderr, or "
                        "appended to FILE")


RAY_ONLY = ("ray_workers", "store", "tokens", "json_progress")


def run(args) -> dict:
    from .adapt_auto import auto_requested, run_auto

    if args.on_top and args.method == "auto":
        raise SharedLLMError("--on-top trains one method's part on top of the group: give --method (e.g. norm)")
    if auto_requested(args):  # --method auto: one user, the smallest good format on a dev slice
        return run_auto(args)
    ray = getattr(args, "ray", False) or getattr(args, "ray_address", None)
    given = [k for k in RAY_ONLY if getattr(args, k, None) is not None] + (["replace"] if getattr(
        args, "replace", False) else [])
    if given and not ray:
        raise SharedLLMError(f"--{given[0].replace('_', '-')} is for a fleet on Ray: add --ray (a local instance) "
                             "or --ray-address")
    if ray and args.retries < 0:
        raise SharedLLMError(f"--retries {args.retries}: give 0 or more")
    if ray or args.manifest or args.out_dir or len(args.text) > 1:
        from .adapt_many import run_many

        return run_many(args)
    if len(args.text) != 1 or not args.out:
        raise SharedLLMError("give --text PATH --out FILE for one user, or several --text (or --manifest) "
                             "with --out-dir DIR")
    return run_one(args)


def run_one(args) -> dict:
    args.text = args.text[0]
    cfg, config, recipe = train_config(args), method_config(args), train_recipe(args)
    base, info = load_for_training(args), {"user_text": Path(args.text).name}
    if args.on_top:
        base, group, group_data = load_group(base, args.on_top)
        info.update(group)
    user = load_user(args.text, base.tokenizer).check(cfg.seq, args.window)
    cap = args.eval_tokens or None
    say(f"{user.source}: {len(user.train)} training tokens, {len(user.heldout)} held-out tokens")
    with autocast(args.dtype, base.device):
        before = evaluate_on(base.model, base, user.heldout, args.window, cap)
    say(f"held-out ppl before: {before['ppl']:.3f}; training {args.method} for {cfg.steps} steps ({args.dtype}, "
        f"lr {cfg.lr:g}: {recipe.name}, {recipe.note})")
    key = run_key(base.fingerprint, args.method, args.dtype, [{"cfg": cfg, "tokens": user.train}], config)
    snapshot = for_method(args.method, beside(args.out), key)
    adapted = personalise(base, user.train.to(base.device), args.method, cfg, method_config=config, dtype=args.dtype,
                          snapshot=snapshot)
    with autocast(args.dtype, base.device):
        after = evaluate_on(adapted.model, base, user.heldout, args.window, cap)
    path = save_adapted(adapted, args.out, base, info=info)
    if args.on_top:
        stack.keep_beside(group_data, Path(args.on_top).name, path.parent)
    snapshot.clear()
    return {"method": args.method, "dtype": args.dtype, "out": str(path), "base": base.name, **recipe.to_json(),
            "base_fingerprint": base.fingerprint,
            "ppl_before": before["ppl"], "ppl_after": after["ppl"], "bpb_before": before["bits_per_byte"],
            "bpb_after": after["bits_per_byte"], "eval_tokens": after["tokens"], "window": after["window"],
            "params": adapted.n_params, "bytes": path.stat().st_size, "steps": adapted.result.steps,
            "on_top": info.get("on_top"),
            "wall_s": round(adapted.result.wall_s, 2), "loss_first": adapted.result.summary()["loss_first"],
            "loss_last": adapted.result.summary()["loss_last"]}


def render(r: dict) -> str:
    if r.get("method") == "auto":
        from .adapt_auto import render_auto

        return render_auto(r)
    if "store_writes" in r:
        from .adapt_ray import render_ray

        return render_ray(r)
    if "users" in r:
        from .adapt_many import render_many

        return render_many(r)
    change = 100 * (r["ppl_after"] / r["ppl_before"] - 1)
    group = f"; on top of group {r['on_top']['file']} (keep it beside this file)" if r.get("on_top") else ""
    return "\n".join([
        f"adapter  {r['out']}  ({r['method']}, {r['params']:,} params, {r['bytes']:,} bytes{group})",
        f"trained  {r['steps']} steps in {r['wall_s']:.1f} s, {r['dtype']}, lr {r['lr']:g} "
        f"({r['recipe']}: {r['lr_source']}) "
        f"(loss {r['loss_first']:.3f} -> {r['loss_last']:.3f})",
        f"held-out token ppl ({r['eval_tokens']} tokens, {r['window']}-token windows): "
        f"{r['ppl_before']:.3f} -> {r['ppl_after']:.3f} ({change:+.1f} %)",
        f"bits/byte {r['bpb_before']:.4f} -> {r['bpb_after']:.4f}"])
