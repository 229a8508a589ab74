"""sharedllm adapt with several users: one training pass for all (sharedllm.fleet), one adapter file per user."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .. import stack
from ..adapters import METHODS, get_method
from ..data import load_user
from ..errors import SharedLLMError
from ..fleet import train_fleet, with_lr
from ..log import say
from ..personalise import evaluate_on, save_adapted
from ..snapshot import Snapshot, run_key
from ..train import autocast
from .args import load_for_training, load_group, method_config, train_config

NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


def _check_name(user: str, source: str) -> str:
    if not NAME.match(user):
        raise SharedLLMError(f"{source}: user name {user!r} is not a safe file name (letters, digits, . _ -)")
    return user


def users_from_texts(texts: list[str]) -> dict[str, dict]:
    """--text A --text B: each user is named after their file (or folder) without its suffix."""
    users = {}
    for text in texts:
        user = _check_name(Path(text).stem, text)
        if user in users:
            raise SharedLLMError(f"two texts give the user name {user!r} ({users[user]['text']}, {text}); "
                                 "use --manifest to name them")
        users[user] = {"text": text}
    return users


def read_manifest(path) -> dict[str, dict]:
    """Lines 'USER PATH' (# comments), or JSON {USER: PATH | {"text": PATH, "lr": X}}; paths relative to it."""
    path = Path(path)
    if not path.is_file():
        raise SharedLLMError(f"{path}: no such manifest file")
    raw = path.read_text(encoding="utf-8")
    entries = _json_manifest(raw, path) if raw.lstrip().startswith("{") else _line_manifest(raw, path)
    if not entries:
        raise SharedLLMError(f"{path}: the manifest names no users")
    for user, e in entries.items():
        _check_name(user, str(path))
        e["text"] = str(path.parent / e["text"])
    return entries


def _json_manifest(raw: str, path: Path) -> dict:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SharedLLMError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    out = {}
    for user, e in data.items():
        e = {"text": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or set(e) - {"text", "lr"}:
            raise SharedLLMError(f"{path}: user {user!r} needs a path or {{\"text\": PATH, \"lr\": X}}")
        if "lr" in e and not (isinstance(e["lr"], (int, float)) and e["lr"] >= 0):
            raise SharedLLMError(f"{path}: user {user!r} has lr {e['lr']!r}; give a number >= 0")
        out[str(user)] = dict(e)
    return out


def _line_manifest(raw: str, path: Path) -> dict:
    out = {}
    for n, line in enumerate(raw.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise SharedLLMError(f"{path}:{n}: expected 'USER PATH', got {line!r}")
        if parts[0] in out:
            raise SharedLLMError(f"{path}:{n}: user {parts[0]!r} appears twice")
        out[parts[0]] = {"text": parts[1]}
    return out


def read_entries(args) -> dict[str, dict]:
    """{user: {"text": PATH, "lr"?: X}} from --manifest and every --text."""
    entries = read_manifest(args.manifest) if args.manifest else {}
    for user, e in users_from_texts(args.text).items():
        if user in entries:
            raise SharedLLMError(f"user {user!r} is both in the manifest and given with --text")
        entries[user] = e
    return entries


def run_many(args) -> dict:

    if args.out or not args.out_dir:
        raise SharedLLMError("several users write one file each: give --out-dir DIR (not --out)")
    if get_method(args.method).caps.rows is None:
        fleet = ", ".join(sorted(n for n, m in METHODS.items() if m.caps.rows is not None))
        raise SharedLLMError(f"several users in one pass train the methods with a per-row kernel ({fleet}), not "
                             f"--method {args.method}; run adapt once per user for it")
    entries = read_entries(args)
    if getattr(args, "ray", False) or getattr(args, "ray_address", None):
        from .adapt_ray import run_ray

        return run_ray(args, entries)
    cfg = train_config(args)
    base, group = load_for_training(args), {}
    if args.on_top:
        base, group, group_data = load_group(base, args.on_top)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        stack.keep_beside(group_data, Path(args.on_top).name, args.out_dir)
    data = {u: load_user(e["text"], base.tokenizer).check(cfg.seq, args.window) for u, e in entries.items()}
    cfgs = {u: with_lr(cfg, e.get("lr", cfg.lr)) for u, e in entries.items()}
    return _train_and_report(args, base, data, cfgs, group)


def _train_and_report(args, base, data: dict, cfgs: dict, group: dict) -> dict:
    start = time.perf_counter()
    config = method_config(args)
    say(f"training {len(data)} {args.method} adapters in one pass for {args.steps} steps "
        f"({len(data)} x {args.batch} rows of {args.seq} tokens per step, {args.dtype})")
    key = run_key(base.fingerprint, args.method, args.dtype, [{"user": u, "cfg": cfgs[u], "tokens": d.train}
                                                              for u, d in data.items()], config)
    snapshot = Snapshot(Path(args.out_dir) / ".fleet.snapshot.safetensors", key)
    adapted = train_fleet(base, {u: d.train.to(base.device) for u, d in data.items()}, cfgs, dtype=args.dtype,
                          snapshot=snapshot, method=args.method, method_config=config)
    train_s = time.perf_counter() - start
    with autocast(args.dtype, base.device):  # scoring in the same compute dtype, as for one user
        rows = [_user_row(args, base, u, data[u], adapted[u], group) for u in data]
    snapshot.clear()
    return {"method": args.method, "dtype": args.dtype, "base": base.name, "base_fingerprint": base.fingerprint,
            "out_dir": args.out_dir, "on_top": group.get(stack.ON_TOP),
            "users": rows, "train_wall_s": round(train_s, 2), "wall_s": round(time.perf_counter() - start, 2),
            "users_per_hour_training": round(3600 * len(rows) / train_s, 1)}


def _user_row(args, base, user: str, data, adapted, group: dict) -> dict:
    cap = args.eval_tokens or None
    before = evaluate_on(base.model, base, data.heldout, args.window, cap)
    after = evaluate_on(adapted.model, base, data.heldout, args.window, cap)
    path = save_adapted(adapted, Path(args.out_dir) / f"{user}.safetensors", base,
                        info={"user": user, "user_text": Path(data.source).name, **group})
    say(f"{user}: held-out ppl {before['ppl']:.3f} -> {after['ppl']:.3f}; wrote {path}")
    summary = adapted.result.summary()
    return {"user": user, "text": data.source, "out": str(path), "lr": adapted.meta["train"]["lr"],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"], "bpb_before": before["bits_per_byte"],
            "bpb_after": after["bits_per_byte"], "eval_tokens": after["tokens"], "params": adapted.n_params,
            "bytes": path.stat().st_size, "steps": adapted.result.steps, "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"]}


def render_many(r: dict) -> str:
    lines = [f"{len(r['users'])} {r['method']} adapters in one pass on {r['base']} ({r['dtype']}): "
             f"training {r['train_wall_s']:.1f} s "
             f"({r['users_per_hour_training']:.0f} users/hour), {r['wall_s']:.1f} s with evaluation"
             + (f"; on top of group {r['on_top']['file']} (kept in {r['out_dir']})" if r.get("on_top") else ""),
             f"{'user':20s} {'lr':>9s} {'steps':>5s} {'loss':>15s} {'held-out ppl':>19s}  adapter"]
    for u in r["users"]:
        change = 100 * (u["ppl_after"] / u["ppl_before"] - 1)
        lines.append(f"{u['user']:20s} {u['lr']:9.2g} {u['steps']:5d} {u['loss_first']:6.3f} -> {u['loss_last']:5.3f} "
                     f"{u['ppl_before']:7.2f} -> {u['ppl_after']:7.2f} ({change:+.1f} %)  {u['out']}")
    return "\n".join(lines)
