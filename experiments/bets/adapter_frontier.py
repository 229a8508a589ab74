"""adapter_frontier: which per-user format is user-specific on real chat users, at what size (issue 31, item 2;
pre-registered 2026-12-07 before any unit ran; the verdict is at 0.5B, `--base qwen2.5-coder-0.5b`).

Per method, on the 12 chat senders (the verdict) and on four same-kind pairs of the clean users (a side verdict):
each user's own adapter on every user's eval texts and on general text (the confusion matrix, as chat_scale), the
bare base, and an adapter trained at the same lr on uniform random tokens in the own adapter's place (the control);
each method's lr is chosen on the dev senders' dev slices (a small grid per method, chat_scale's rule), never on an
eval text. The methods (METHODS): norm; norm plus (IA)^3's FFN-intermediate scaling (`norm_ia3ff`: every RMSNorm
gain and one (IA)^3 vector on up_proj's output, trained together; a bet-local method, registered only while its
units run, so it has no per-row kernel and is not served); (IA)^3 on all seven linears; RoAd (road_1); VeRA (r 256,
A and B regenerated from the config's seed, never saved per user); LoRA-XS (r 16, SVD bases of the base's weights,
never saved); LoRA-r1 (alpha 2: LoRA-r4's scale alpha/r = 2); LoRA-r4 (alpha 8); and **hierarchical** (`hier`): one
LoRA-r4 trained on the pooled training text of the cohort (the group: every user of that cohort) at LoRA-r4's chosen
lr for SHARED_STEPS_FACTOR x the budget, merged into a private copy of the base (the product has no hierarchical
adapter: this is the minimum, in the bet), then a per-user norm adapter on that merged base; a user's per-user part
is judged against the other users' per-user parts on the same shared adapter, the shared adapter alone and the bare
base. Two non-adapter baselines: **in-context** (`incontext`: the user's own most recent training tokens, as many as
fit the model's window (at most IC_CONTEXT tokens with the eval window), as a prefix when scoring each 256-token eval
window; only the window's tokens are scored, the same tokens an adapter is scored on) and its control (another
user's text as the prefix: the off-diagonal of its confusion matrix).

Bytes per user: the scored fp16 adapter file; the int8 file of the same adapter (`sharedllm compress --scheme int8`)
is written and counted but not scored. The hierarchical adapter's per-user bytes are its per-user part's (the shared
file is counted once per group, recorded apart). CPU-seconds: the training loop's process CPU time (sidecar).

`adapter_frontier_screen` (its own module) runs the same code on 6 senders with fewer steps, one dev sender and the
random-token control for 2 senders, on the default base (issue 31, item 5's screen): a screen, not the verdict.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sharedllm.bets.cells import ppl, scored, select, values
from sharedllm.bets.common import GENERAL, AdapterSpec, _save, _trained, adapter_path, snapshot_key
from sharedllm.bets.harness import grade, main, not_run
from sharedllm.bets.spec import Bet

from .chat_cohort import USERS, name
from .chat_scale import DEV_USERS

# ---- the methods: registry name, method config, lr grid (fixed before running) ----
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_GRID = [5e-4, 2e-3, 5e-3]
LORA_GRID = [2e-4, 1e-3, 3e-3]
METHODS = {  # in run order: the KB-scale ones first, LoRA after, hierarchical (needs LoRA-r4's lr) last
    "norm": ("norm", None, NORM_GRID),
    "loraxs": ("loraxs", None, [2e-4, 1e-3, 5e-3]),
    "ia3_all": ("ia3", {"targets": list(ALL)}, [1e-3, 5e-3, 2e-2]),
    "vera": ("vera", None, [2e-3, 1e-2, 4e-2]),
    "road": ("road", None, NORM_GRID),
    "norm_ia3ff": ("norm_ia3ff", None, NORM_GRID),
    "lora_r1": ("lora", {"rank": 1, "alpha": 2}, LORA_GRID),
    "lora_r4": ("lora", None, LORA_GRID),
    "hier": ("norm", None, NORM_GRID),  # the per-user part; the shared part: LoRA-r4 at lora_r4's chosen lr
}
BASELINES = ("incontext",)
SHARED_STEPS_FACTOR = 2
IC_CONTEXT = 8192  # tokens in all (prefix + eval window) for the in-context baseline, or the model's window if less
SIZE_LIMIT = 256 * 1024  # bytes per user (the scored fp16 file)
CLEAN_PAIRS = ["programmer/cpython_asyncio", "programmer/requests", "novelist/austen_pride_and_prejudice",
               "novelist/dickens_tale_of_two_cities", "scientist/arxiv_astro_ph", "scientist/arxiv_cond_mat",
               "heterogeneous/speeches_clinton_sotu", "heterogeneous/speeches_reagan_sotu"]


@dataclass(frozen=True)
class Plan:
    """What one bet of this module runs (the full bet, or the screen)."""
    chat: tuple
    clean: tuple
    dev: tuple
    steps: int | None  # None: the bets' budget (TrainConfig: 100 steps, batch 2 x 256)
    eval_len: int | None  # tokens per eval text; None: the bets' 2,048
    random_users: int | None  # the random-token control for the first N users of each cohort; None: all
    screen: bool
    methods: tuple = tuple(METHODS)  # the METHODS keys this bet runs (the full bet and its wide part split them)
    baselines: bool = True  # the in-context baseline and its control
    size_bound: bool = True  # the verdict over the methods within SIZE_LIMIT (False: any measured method)


# The budget split of the 0.5B bet (fixed 2026-12-07, after the screen's first methods and before any 0.5B frontier
# unit ran): every method of the pre-registration at 0.5B, as pre-registered, is ~20 CPU-h (dev grid on 3 senders, 20
# users, 20 random-token adapters, 100 steps), ~190 CPU-h in all: weeks on this 2-core machine. The verdict can only
# be carried by a method whose per-user fp16 file at 0.5B is <= SIZE_LIMIT, and the files' sizes follow from the
# shapes (bench/method_bytes.py, bench/results/method_bytes_qwen2.5-coder-0.5b.json): norm 88.5 KB, LoRA-XS 87.9 KB,
# hier's per-user part (a norm file) fit; (IA)^3 on all linears (~608 KB), RoAd (611 KB), VeRA (697 KB), norm+(IA)^3
# FFN (~321 KB), LoRA-r1 (~1.1 MB) and LoRA-r4 (4.4 MB) do not. So adapter_frontier runs the methods that can carry
# its verdict, with LoRA-r4 (hier's shared part is trained at its chosen lr; most of its units are chat_scale's, the
# same adapters and scores at 0.5B) and the in-context baseline, exactly as pre-registered; adapter_frontier_wide runs
# the other five on the 12 chat senders (3 dev senders, the random-token control for 2), a side bet for the plot.
VERDICT_METHODS = ("norm", "loraxs", "lora_r4", "hier")
WIDE_METHODS = tuple(k for k in METHODS if k not in VERDICT_METHODS)
SPLIT = ("budget split, fixed before any 0.5B unit ran: this bet runs the methods whose per-user fp16 file at 0.5B "
         "can be <= size_limit_bytes (norm, loraxs, hier's per-user part) with lora_r4 (hier's shared part uses its "
         "lr) and the in-context baseline; adapter_frontier_wide runs " + ", ".join(WIDE_METHODS) + " (over the "
         "bound at 0.5B) on the chat senders, a side bet; all methods as pre-registered would be ~190 CPU-h")
FULL = Plan(chat=tuple(USERS), clean=tuple(CLEAN_PAIRS), dev=tuple(DEV_USERS), steps=None, eval_len=None,
            random_users=None, screen=False, methods=VERDICT_METHODS)
WIDE = Plan(chat=tuple(USERS), clean=(), dev=tuple(DEV_USERS), steps=None, eval_len=None, random_users=2,
            screen=False, methods=WIDE_METHODS, baselines=False, size_bound=False)
SCREEN = Plan(chat=tuple(USERS[:6]), clean=(), dev=("chat/sender_0f9fe1f8",), steps=50, eval_len=1024,
              random_users=2, screen=True)
QUICK_USERS = 3

HYPOTHESIS = ("At 0.5B (qwen2.5-coder-0.5b), with each method's lr chosen on this base's dev slices, some adapter "
              "method of <= 256 KiB per user (fp16 file) makes each chat sender's own adapter >= 5 % lower held-out "
              "ppl than every other sender's adapter of the same method and than the bare base for >= 2/3 of the 12 "
              "chat senders, with every own adapter's general-text ppl <= 1.05x the base's.")
CRITERIA = {
    "margin": 0.05, "size_limit_bytes": SIZE_LIMIT,
    "methods": {k: {"method": m, "config": c, "grid": g} for k, (m, c, g) in METHODS.items()},
    "baselines": {"incontext": f"own most recent training tokens as a prefix, prefix + window <= {IC_CONTEXT} "
                               "tokens or the model's window; control: another sender's text as the prefix"},
    "hier": f"shared LoRA-r4 on the cohort's pooled training text at lora_r4's chosen lr, {SHARED_STEPS_FACTOR}x "
            "the steps, merged into a copy of the base; per-user norm on top; rivals: other users' per-user parts on "
            "the same shared adapter, the shared adapter alone, the bare base",
    "lr_choice": "per method, the grid lr with the lowest mean over the dev senders of log(dev ppl / base dev ppl); "
                 "ties -> the smaller lr; a choice at the grid's edge is reported, the grid is not extended",
    "win": "own ppl <= (1 - margin) x min(every other user's adapter of the same method, base) pooled over the 3 "
           "eval texts (hier: also the shared adapter alone)",
    "eligible": "an adapter method (not a baseline) whose largest own fp16 file is <= size_limit_bytes",
    "STRICT": {"min_fraction_of_users_won": 2 / 3, "users": len(USERS), "max_general_ratio": 1.05},
    "LENIENT": {"above_fraction_of_users_won": 0.5, "max_general_ratio": 1.10},
    "CATASTROPHIC": {"max_fraction_of_users_won": 0.25},
    "verdict_rule": "STRICT: some eligible method meets STRICT's fraction over every declared chat sender and every "
                    "own adapter's general ppl / base's <= its bound; LENIENT: some eligible method wins for more "
                    "than LENIENT's fraction with general <= its bound; CATASTROPHIC: every eligible method measured "
                    "wins for <= CATASTROPHIC's fraction (or none is eligible)",
    "side": "per method, the same tiers on its own matrix (no size bound); the clean same-kind pairs by the verdict "
            "rule; in-context by the per-method tiers",
    "controls": "random-token adapters in the own adapter's place, by the verdict rule",
    "screen_out": "screen only: a method is screened out (run last at 0.5B) if it wins for no sender and its median "
                  "own-vs-best-other margin is < 2 %, or some own adapter's general ppl is > 1.25x the base's, or "
                  "another method with no more bytes per user has a higher median margin and wins for at least as "
                  "many senders",
    "expected": "not judged, written before running: FAIL at 0.5B (chat_scale's 0.5B norm and the clean corpora: the "
                "same-kind rival does almost as well); in-context ahead of every adapter on own-vs-base",
}
EPS = 1e-9


# ---- the bet-local composite method: norm gains plus (IA)^3 on up_proj ----

@dataclass(frozen=True)
class NormIA3Config:
    ia3_targets: tuple = ("up_proj",)


class NormIA3FF:
    """Every RMSNorm gain and one (IA)^3 vector scaling up_proj's output (the FFN intermediate), trained together."""
    name = "norm_ia3ff"

    def __init__(self, config: NormIA3Config = NormIA3Config()):
        from sharedllm.adapters import Capabilities

        self.config, self.caps = config, Capabilities()

    def attach(self, model):
        from sharedllm.adapters import get_method
        from sharedllm.adapters.ia3 import IA3Config

        return get_method("ia3", IA3Config(targets=self.config.ia3_targets)).attach(model)

    def trainable(self, model) -> dict:
        from sharedllm.adapters import get_method
        from sharedllm.adapters.ia3 import PREFIX
        from sharedllm.arch import norm_modules

        norms = {f"{n.removeprefix(PREFIX)}.weight": m.weight for n, m in norm_modules(model).items()}
        return {**norms, **get_method("ia3").trainable(model)}


@contextlib.contextmanager
def registered(key: str):
    """norm_ia3ff in the registry while its units run (train, load, score), and out of it afterwards."""
    from sharedllm.adapters import METHODS as REGISTRY

    if METHODS[key][0] != "norm_ia3ff" or "norm_ia3ff" in REGISTRY:
        yield
        return
    REGISTRY["norm_ia3ff"] = NormIA3FF()
    try:
        yield
    finally:
        REGISTRY.pop("norm_ia3ff", None)


# ---- the run ----

def plan_of(ctx, plan: Plan) -> Plan:
    if not ctx.quick:
        return plan
    return replace(plan, chat=tuple(USERS[:QUICK_USERS]), clean=tuple(CLEAN_PAIRS[:2]) if plan.clean else (),
                   dev=(USERS[0],), steps=None, eval_len=None, random_users=2 if plan.random_users else None)


def grid(ctx, key: str) -> list:
    return METHODS[key][2][:2] if ctx.quick else METHODS[key][2]


def make_run(plan0: Plan):
    def run(ctx) -> list:
        plan = plan_of(ctx, plan0)
        if plan.eval_len and not ctx.quick:
            ctx.text_len = plan.eval_len  # fixed in the plan (scored texts, dev slice and cache keys follow it)
        ctx.notes.update(notes(ctx, plan))
        cohorts = [("chat", list(plan.chat))] + ([("clean", list(plan.clean))] if plan.clean else [])
        cells = ctx.unit("dev/base", lambda: [scored(*ctx.score_dev(None, u), kind="dev", method="none", lr=0.0,
                                                     adapter="base", user=name(u)) for u in plan.dev])
        for cohort, users in cohorts:
            cells += base_rows(ctx, cohort, users)
        lrs, order = {}, [k for k in method_order(None if plan.screen or ctx.quick else committed_screen())
                          if k in plan.methods]
        ctx.notes["method_order"] = order
        # the verdict's units first (each method's dev choice and chat matrix), then in-context, then the clean
        # pairs (a side verdict), then the random-token controls: the same units in any order (keyed by name)
        for key in order:
            cells += screen_units(ctx, plan, key, lrs)
            if ctx.deferred and not all_dev(cells, plan, key, ctx):
                break  # Ray enumeration: the later methods wait on this choice
            lrs[key] = chosen_lr(cells, key)
            cells += matrix(ctx, plan, *cohorts[0], key, lrs)
        for i, (cohort, users) in enumerate(cohorts):
            cells += incontext(ctx, cohort, users) if plan.baselines else []
            for key in lrs if i else ():
                cells += matrix(ctx, plan, cohort, users, key, lrs)
        ctx.notes["chosen_lrs"] = lrs
        for key in lrs:
            for cohort, users in cohorts:
                cells += randoms(ctx, plan, cohort, users, key, lrs)
        return cells
    return run


def committed_screen() -> dict | None:
    """The screen's finished result on the default base (results/adapter_frontier_screen.json), if committed."""
    from sharedllm.bets.catalogue import current

    path = current().results / "adapter_frontier_screen.json"
    return json.loads(path.read_text()) if path.is_file() else None


def method_order(screen: dict | None) -> list:
    """The full bet's run order: the methods the screen kept first, the screened-out ones last (the criteria's
    "screen_out": "run last at 0.5B"), each group in METHODS order; hier always after lora_r4 (its shared part is
    trained at lora_r4's chosen lr). No finished screen: METHODS order."""
    if screen is None or screen.get("incomplete"):
        return list(METHODS)
    out = screen_out(screen["cells"], screen["criteria"])
    order = [k for k in METHODS if k not in out] + [k for k in METHODS if k in out]
    if order.index("hier") < order.index("lora_r4"):
        order.remove("lora_r4")
        order.insert(order.index("hier"), "lora_r4")
    return order


def notes(ctx, plan: Plan) -> dict:
    cfg = ctx.train_config(0)
    steps = plan.steps or cfg.steps
    out = {"steps": steps, "dev_users": [name(u) for u in plan.dev], "methods": list(plan.methods),
           "cohorts": {"chat": [name(u) for u in plan.chat], "clean": [name(u) for u in plan.clean]},
           "random_control_users": plan.random_users or "all", "shared_steps": SHARED_STEPS_FACTOR * steps,
           "lr_source": "each method's dev-slice grid on this base (no recommended lr used)",
           "norm_ia3ff": "bet-local method (registered only while its units run): no per-row kernel, not servable",
           "hier": "bet code: shared LoRA-r4 merged into a private copy of the base, per-user norm on top (no product "
                   "code for hierarchical adapters)",
           "int8_bytes": "the int8 (per tensor) file of each own adapter is counted, not scored"}
    if plan.screen:
        out["screen"] = ("a SCREEN (issue 31 item 5), not the verdict: the verdict is bet adapter_frontier at 0.5B; "
                         f"{len(plan.chat)} senders, {steps} steps, {ctx.text_len} tokens per eval text, one dev "
                         f"sender, random-token control for the first {plan.random_users} senders")
        if not ctx.quick:
            out["screen_base_note"] = "run on the base given (default: smollm2-135m); the hypothesis is about 0.5B"
    return out


def all_dev(cells: list, plan: Plan, key: str, ctx) -> bool:
    dev = select(cells, kind="dev", method=key)
    return len(dev) == len(grid(ctx, key)) * len(plan.dev)


def train_cfg(ctx, plan: Plan, lr: float, factor: int = 1):
    cfg = ctx.train_config(0, lr)
    return replace(cfg, steps=(plan.steps or cfg.steps) * factor) if (plan.steps or factor > 1) else cfg


def train_file(ctx, plan: Plan, rel: str, key: str, lr: float, tokens=None, tag: str = "", base=None,
               factor: int = 1) -> Path:
    """The cached adapter of `rel` for method `key` at `lr` (trained once, like ctx.adapter, with the method's
    config and the plan's steps); its sidecar records the training CPU seconds."""
    from sharedllm.personalise import personalise
    from sharedllm.snapshot import beside, for_method

    method, config, _ = METHODS[key] if key != "shared" else ("lora", None, None)
    base = base or ctx.base
    cfg, dtype = train_cfg(ctx, plan, lr, factor), ctx.opts.dtype
    suffix = f"_{key}" if key not in ("norm", "lora_r4", "shared") else ""
    path = adapter_path(base, rel, method, cfg, suffix + tag, ctx.opts.out, dtype)
    ctx.seeds_used.add(0)
    if _trained(path, dtype):
        return path
    tokens = ctx.data(rel).train if tokens is None else tokens
    spec = AdapterSpec(rel, tokens, cfg, suffix + tag)
    snapshot = for_method(method, beside(path), {**snapshot_key(base, [spec], method, dtype), "config": config})
    adapted = personalise(base, tokens.to(base.device), method, cfg, label=f"{rel} {key}{tag}", method_config=config,
                          dtype=dtype, snapshot=snapshot)
    _save(adapted, path, base, spec, method, dtype, cpu_s=round(adapted.result.cpu_s, 1), frontier_method=key)
    snapshot.clear()
    return path


def footprint(ctx, path: Path, base=None) -> dict:
    """fp16 file bytes, int8 file bytes (not scored), trainable numbers, training wall and CPU seconds."""
    from sharedllm.personalise import load_adapted
    from sharedllm.quant.compress import encode_adapter

    base = base or ctx.base
    side = json.loads(path.with_suffix(".json").read_text())
    int8 = len(encode_adapter(base, load_adapted(base, path), "int8"))
    return {"bytes": path.stat().st_size, "int8_bytes": int8, "params": side["params"],
            "train_s": round(side["wall_s"], 1), "cpu_s": side.get("cpu_s", side.get("fleet", {}).get("cpu_s"))}


def base_rows(ctx, cohort: str, users: list) -> list:
    cells = []
    for u in users:
        cells += ctx.unit(f"base/{name(u)}", lambda u=u: ctx.score_cells(
            None, u, kind="confusion", method="none", adapter="base", user=name(u), lr=0.0, cohort=cohort))
    return cells + ctx.unit(f"base/general/{cohort}", lambda: ctx.score_cells(
        None, GENERAL, kind="general", method="none", adapter="base", user="general", lr=0.0, cohort=cohort))


def screen_units(ctx, plan: Plan, key: str, lrs: dict) -> list:
    cells = []
    for lr in grid(ctx, key):
        for u in plan.dev:
            cells += ctx.unit(f"dev/{key}/lr{lr:g}/{name(u)}", lambda u=u, lr=lr: dev_unit(ctx, plan, key, u, lr,
                                                                                            lrs))
    return cells


def dev_unit(ctx, plan: Plan, key: str, u: str, lr: float, lrs: dict) -> list:
    with registered(key):
        c, path = where(ctx, plan, key, u, lr, lrs, "chat")
        cell = scored(*c.score_dev(path, u), kind="dev", method=key, lr=lr, adapter=name(u), user=name(u))
        c.release()
    return [cell]


def hier_ctx(ctx, plan: Plan, cohort: str, lrs: dict):
    """The context on the base with the cohort's shared LoRA-r4 merged in (built once per run and cohort)."""
    users = list(plan.chat if cohort == "chat" else plan.clean)
    shared = shared_file(ctx, plan, cohort, users, lrs["lora_r4"])
    memo = ctx.notes.setdefault("hier_shared", {})
    if str(shared) not in _MERGED:
        _MERGED[str(shared)] = ctx.rebased(merged_base(ctx.base, shared))
    memo[cohort] = {"shared_file": shared.name, "shared_bytes": shared.stat().st_size,
                    "merged_fingerprint": _MERGED[str(shared)].base.fingerprint}
    return _MERGED[str(shared)], shared


_MERGED: dict = {}


def shared_file(ctx, plan: Plan, cohort: str, users: list, lr: float) -> Path:
    pooled = torch.cat([ctx.data(u).train for u in users])
    group = hashlib.sha256("|".join(users).encode()).hexdigest()[:10]
    return train_file(ctx, plan, f"_groups/{cohort}-{group}", "shared", lr, tokens=pooled, factor=SHARED_STEPS_FACTOR)


def merged_base(base, shared: Path):
    """A private copy of `base` with the shared LoRA merged into its weights, bound to the base and to the shared
    file (personalise.stacked_base: the product's hierarchical adapter, so per-user parts trained here load and serve there)."""
    from sharedllm.personalise import stacked_base

    return stacked_base(base, shared.read_bytes(), str(shared))


def where(ctx, plan, key, u, lr, lrs, cohort, tokens=None, tag=""):
    """(the context whose base the adapter is on, the adapter's path)."""
    if key == "hier":
        c, _ = hier_ctx(ctx, plan, cohort, lrs)
        return c, train_file(c, plan, u, key, lr, tokens=tokens, tag=tag)
    return ctx, train_file(ctx, plan, u, key, lr, tokens=tokens, tag=tag)


def matrix(ctx, plan: Plan, cohort: str, users: list, key: str, lrs: dict) -> list:
    lr = lrs[key]
    cells = []
    if key == "hier":
        cells += ctx.unit(f"{cohort}/hier/shared", lambda: shared_row(ctx, plan, cohort, users, lrs))
    for a in users:
        cells += ctx.unit(f"{cohort}/{key}/lr{lr:g}/{name(a)}", lambda a=a: matrix_row(ctx, plan, cohort, users, key,
                                                                                        a, lrs))
    return cells


def matrix_row(ctx, plan, cohort, users, key, a, lrs) -> list:
    lr, cells = lrs[key], []
    with registered(key):
        c, path = where(ctx, plan, key, a, lr, lrs, cohort)
        own = footprint(c, path, c.base)
        for u in users:
            cells += c.score_cells(path, u, kind="confusion", method=key, adapter=name(a), user=name(u), lr=lr,
                                   cohort=cohort, **(own if u == a else {}))
        cells += c.score_cells(path, GENERAL, kind="general", method=key, adapter=name(a), user="general", lr=lr,
                               cohort=cohort)
        c.release()
    return cells


def shared_row(ctx, plan, cohort, users, lrs) -> list:
    _, shared = hier_ctx(ctx, plan, cohort, lrs)
    cells = []
    for u in users:
        cells += ctx.score_cells(shared, u, kind="confusion", method="hier", adapter="shared", user=name(u),
                                 lr=lrs["lora_r4"], cohort=cohort)
    cells += ctx.score_cells(shared, GENERAL, kind="general", method="hier", adapter="shared", user="general",
                             lr=lrs["lora_r4"], cohort=cohort, bytes=shared.stat().st_size)
    ctx.release()
    return cells


def randoms(ctx, plan, cohort, users, key, lrs) -> list:
    lr, cells = lrs[key], []
    for u in users[:plan.random_users or len(users)]:
        cells += ctx.unit(f"random/{cohort}/{key}/lr{lr:g}/{name(u)}", lambda u=u: random_unit(
            ctx, plan, cohort, u, key, lrs))
    return cells


def random_unit(ctx, plan, cohort, u, key, lrs) -> list:
    with registered(key):
        c, path = where(ctx, plan, key, u, lrs[key], lrs, cohort, tokens=ctx.random_tokens(u), tag="_random")
        cells = c.score_cells(path, u, kind="random", method=key, adapter=name(u), user=name(u), lr=lrs[key],
                              cohort=cohort)
        c.release()
    return cells


# ---- the in-context baseline ----

def ic_prefix_len(ctx, rel: str) -> int:
    window = ctx.window + 1
    limit = min(IC_CONTEXT, int(getattr(ctx.base.model.config, "max_position_embeddings", IC_CONTEXT)))
    return min(limit - window, len(ctx.data(rel).train))


def incontext(ctx, cohort: str, users: list) -> list:
    cells = []
    for a in users:
        cells += ctx.unit(f"{cohort}/incontext/{name(a)}", lambda a=a: incontext_row(ctx, cohort, users, a))
    return cells


def incontext_row(ctx, cohort: str, users: list, a: str) -> list:
    """User a's most recent training tokens as the prefix of every eval window of every user (and general text)."""
    from sharedllm.compat import cache_kwargs
    from transformers import DynamicCache

    model, n = ctx.base.model, ic_prefix_len(ctx, a)
    prefix = ctx.data(a).train[-n:].to(ctx.base.device)
    state: dict = {}

    def cache():
        if "c" not in state:
            c = DynamicCache()
            with torch.no_grad(), ctx.autocast():
                for s in range(0, n, 512):
                    model(input_ids=prefix[None, s:s + 512], use_cache=True, **cache_kwargs(model, c))
            state["c"] = c
        return state["c"]

    def score(rel: str, i: int) -> tuple[float, int]:
        key = f"incontext|{a}|P{n}|{rel}|{i}/{ctx.n_texts}x{ctx.text_len}|w{ctx.window}{ctx._dtype_key}"
        hit = ctx.cache.get(key)
        if hit is None:
            total, count = 0.0, 0
            for w in ctx.windows(ctx.texts(rel)[i]).to(ctx.base.device):
                c = cache()
                with torch.no_grad(), ctx.autocast():
                    logits = model(input_ids=w[None, :-1], use_cache=True, **cache_kwargs(model, c)).logits
                total += torch.nn.functional.cross_entropy(logits[0].float(), w[1:], reduction="sum").item()
                count += len(w) - 1
                c.crop(-(len(w) - 1))  # back to the prefix alone (transformers 5: tokens to remove, negative)
                assert c.get_seq_length() == n, (c.get_seq_length(), n)
            hit = [total, count]
            ctx.cache.put(key, hit)
        return float(hit[0]), int(hit[1])

    cells = []
    for u in users + [GENERAL]:
        kind, user = ("general", "general") if u == GENERAL else ("confusion", name(u))
        for i in range(ctx.n_texts):
            cells.append(scored(*score(u, i), kind=kind, method="incontext", adapter=name(a), user=user, lr=0.0,
                                cohort=cohort, text=i, **({"prefix_tokens": n, "bytes": 0} if u == a else {})))
    state.clear()
    ctx.cache.flush()
    return cells


# ---- pure functions of the cells: the lr choice, the per-method numbers, the verdicts ----

def dev_score(cells: list, key: str, lr: float) -> float:
    dev = select(cells, kind="dev")
    users = values(dev, "user", method=key)
    return sum(math.log(ppl(dev, method=key, lr=lr, user=u) / ppl(dev, adapter="base", user=u))
               for u in users) / len(users)


def chosen_lr(cells: list, key: str) -> float:
    lrs = sorted(values(cells, "lr", kind="dev", method=key))
    return min(lrs, key=lambda lr: (round(dev_score(cells, key, lr), 12), lr))


def cohort_cells(cells: list, cohort: str, key: str) -> list:
    """The method's confusion cells in the cohort, with the base row."""
    return [c for c in cells if c.get("cohort") == cohort and c["kind"] == "confusion"
            and c["method"] in (key, "none")]


def measured(cells: list, cohort: str) -> list:
    """Methods (and baselines) whose own cell is there for every user of the cohort."""
    users = values(select(cells, kind="confusion", method="none", cohort=cohort), "user")
    out = []
    for key in list(METHODS) + list(BASELINES):
        own = {c["user"] for c in select(cells, kind="confusion", method=key, cohort=cohort) if c["adapter"] == c["user"]}
        if users and own >= set(users):
            out.append(key)
    return out


def stats(cells: list, cohort: str, key: str, margin: float) -> dict:
    """Per user: own ppl, lead over the best rival of the same method (not the base), gain over the base, won."""
    conf = cohort_cells(cells, cohort, key)
    users = values(select(conf, method="none"), "user")
    per = {}
    for u in users:
        own = ppl(conf, user=u, adapter=u, method=key)
        others = [ppl(conf, user=u, adapter=a, method=key) for a in values(conf, "adapter", user=u, method=key)
                  if a != u]
        base = ppl(conf, user=u, adapter="base")
        per[u] = {"own": own, "lead": 1 - own / min(others) if others else float("nan"), "gain": 1 - own / base,
                  "won": all(own <= (1 - margin) * r for r in others + [base])}
    own_cells = [c for c in conf if c["method"] == key and c["adapter"] == c["user"] and "bytes" in c]
    gen = select(cells, kind="general", cohort=cohort)
    gbase = ppl(gen, method="none")
    ratios = [ppl(gen, method=key, adapter=a) / gbase for a in values(gen, "adapter", method=key) if a in per]
    return {"users": per, "fraction": sum(p["won"] for p in per.values()) / max(len(per), 1),
            "bytes": max((c["bytes"] for c in own_cells), default=None),
            "int8_bytes": max((c.get("int8_bytes") or 0 for c in own_cells), default=None),
            "params": max((c.get("params") or 0 for c in own_cells), default=None),
            "cpu_s": statistics.median([c["cpu_s"] for c in own_cells if c.get("cpu_s") is not None] or [float("nan")]),
            "general": max(ratios) if ratios else None,
            "median_lead": statistics.median([p["lead"] for p in per.values()]) if per else float("nan")}


def eligible(s: dict, key: str, criteria: dict) -> bool:
    return key in METHODS and s["bytes"] is not None and s["bytes"] <= criteria["size_limit_bytes"]


def tiers(s: dict, criteria: dict, n_declared: int | None) -> tuple[bool, bool, bool]:
    """(STRICT, LENIENT, CATASTROPHIC) of one method's numbers; n_declared: users STRICT needs (None: any)."""
    f, g = s["fraction"], s["general"] if s["general"] is not None else math.inf
    strict = (f >= criteria["STRICT"]["min_fraction_of_users_won"] - EPS
              and g <= criteria["STRICT"]["max_general_ratio"] + EPS and (n_declared is None or len(s["users"]) >= n_declared))
    lenient = (f > criteria["LENIENT"]["above_fraction_of_users_won"] + EPS
               and g <= criteria["LENIENT"]["max_general_ratio"] + EPS)
    return strict, lenient, f <= criteria["CATASTROPHIC"]["max_fraction_of_users_won"] + EPS


def rule(cells: list, criteria: dict, cohort: str = "chat", n_declared: int | None = None,
         size_bound: bool = True) -> str:
    """The verdict rule over the eligible methods measured in the cohort (size_bound False: every measured one)."""
    keys = [key for key in measured(cells, cohort) if key in METHODS]
    if not keys:
        raise KeyError(f"no adapter method measured in cohort {cohort}")
    judged = [tiers(s, criteria, n_declared) for key in keys
              for s in [stats(cells, cohort, key, criteria["margin"])] if not size_bound or eligible(s, key, criteria)]
    return grade(any(t[0] for t in judged), any(t[1] for t in judged), all(t[2] for t in judged))


def make_verdict(plan: Plan):
    def verdict(cells: list, criteria: dict) -> str:
        return rule(cells, criteria, "chat", len(plan.chat) if plan.screen else criteria["STRICT"]["users"],
                    plan.size_bound)
    return verdict


def method_tier(cells: list, criteria: dict, cohort: str, key: str) -> str:
    return grade(*tiers(stats(cells, cohort, key, criteria["margin"]), criteria, None))


def side_verdicts(cells: list, criteria: dict) -> dict:
    out = {f"{key} alone (no size bound)": method_tier(cells, criteria, "chat", key)
           for key in measured(cells, "chat")}
    if select(cells, cohort="clean"):
        out["the clean same-kind pairs, by the verdict rule"] = rule(cells, criteria, "clean")
    return out


def random_as_own(cells: list, key: str, cohort: str) -> list:
    """The method's cells with each user's own adapter replaced by its random-token adapter (users that have one);
    the footprint and general cells stay the real adapter's."""
    rand = select(cells, kind="random", method=key, cohort=cohort)
    users = values(rand, "user")
    keep = [c for c in cells if not (c.get("cohort") == cohort and c["kind"] == "confusion" and c["method"] == key
                                     and c["adapter"] == c["user"])]
    keep = [c for c in keep if not (c.get("cohort") == cohort and c["kind"] == "confusion" and c["user"] not in users)]
    own = {c["user"]: c for c in select(cells, kind="confusion", method=key, cohort=cohort)
           if c["adapter"] == c["user"] and "bytes" in c}
    return keep + [{**c, "kind": "confusion", **{k: own[c["user"]][k] for k in ("bytes", "int8_bytes", "params",
                                                                                 "cpu_s") if c["user"] in own
                                                  and k in own[c["user"]] and c["text"] == 0}} for c in rand]


def controls(cells: list, criteria: dict) -> dict:
    keys = [k for k in measured(cells, "chat") if k in METHODS and select(cells, kind="random", method=k, cohort="chat")]
    if not keys:
        return {"random-token adapters as the senders' own": not_run("no random-token cells")}
    out = {}
    for k in keys:
        judged = random_as_own(cells, k, "chat")
        s = stats(judged, "chat", k, criteria["margin"])
        out[f"{k} adapter of random tokens as the sender's own"] = grade(*tiers(s, criteria, None))
    return out


def screen_out(cells: list, criteria: dict, cohort: str = "chat") -> dict:
    """method -> why it is screened out (the pre-registered screen rule), for the measured adapter methods."""
    s = {k: stats(cells, cohort, k, criteria["margin"]) for k in measured(cells, cohort) if k in METHODS}
    out = {}
    for k, v in s.items():
        won = sum(p["won"] for p in v["users"].values())
        if won == 0 and v["median_lead"] < 0.02:
            out[k] = f"wins for no sender, median margin {100 * v['median_lead']:.1f} % < 2 %"
        elif v["general"] is not None and v["general"] > 1.25:
            out[k] = f"general ppl x{v['general']:.2f} > 1.25"
        else:
            better = [o for o, w in s.items() if o != k and w["bytes"] <= v["bytes"]
                      and w["median_lead"] > v["median_lead"]
                      and sum(p["won"] for p in w["users"].values()) >= won]
            if better:
                out[k] = f"dominated by {better[0]} (no more bytes, higher median margin, at least as many wins)"
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def method_line(cells: list, cohort: str, key: str) -> str:
    s = stats(cells, cohort, key, CRITERIA["margin"])
    leads = [p["lead"] for p in s["users"].values()]
    gains = [p["gain"] for p in s["users"].values()]
    won = sum(p["won"] for p in s["users"].values())
    lr = "" if key in BASELINES else f" lr {chosen_lr(cells, key):g}"
    size = "" if key in BASELINES else (f", {s['bytes']:,} B fp16 / {s['int8_bytes']:,} B int8, "
                                        f"{s['params']:,} numbers, {s['cpu_s']:.0f} CPU-s")
    gen = f", general x{s['general']:.3f}" if s["general"] is not None else ""
    return (f"{key}{lr}: won {won}/{len(s['users'])}, vs base {_pct(min(gains))} to {_pct(max(gains))} %, vs best "
            f"other {_pct(min(leads))} to {_pct(max(leads))} % (median {_pct(s['median_lead'])}){gen}{size}")


def make_summary(plan: Plan):
    def summary(cells: list) -> str:
        parts = [method_line(cells, "chat", k) for k in measured(cells, "chat")]
        if plan.screen:
            out = screen_out(cells, CRITERIA)
            parts.append("screened out: " + ("; ".join(f"{k} ({v})" for k, v in out.items()) or "none"))
        return "; ".join(parts) if parts else "no method measured yet"
    return summary


def pareto_points(result: dict, cohort: str = "chat") -> list:
    """(method, fp16 bytes per user, median / min / max own-vs-best-other margin) per measured method: the plot."""
    cells, out = result["cells"], []
    for key in measured(cells, cohort):
        s = stats(cells, cohort, key, result["criteria"]["margin"])
        leads = [p["lead"] for p in s["users"].values()]
        out.append((key, s["bytes"] or 0, s["median_lead"], min(leads), max(leads)))
    return out


def draw_pareto(series: list, path: Path, title: str, criteria: dict, legend: str | None = None) -> Path:
    """The Pareto plot: `series` [(label, hollow, pareto_points)], one marker shape per series (its label in the
    legend when `legend` titles one), one colour per method, the users' spread as bars."""
    import matplotlib.pyplot as plt

    from .figures import save

    fig, ax = plt.subplots(figsize=(8, 5))
    i = 0
    for n, (label, hollow, points) in enumerate(series):
        marker = "osD^v"[n % 5]
        for key, size, mid, lo, hi in points:
            x = max(size, 1)  # in-context stores nothing per user: drawn at 1 byte
            colour = f"C{list(METHODS).index(key) if key in METHODS else 9}"
            ax.errorbar([x], [100 * mid], yerr=[[100 * (mid - lo)], [100 * (hi - mid)]], fmt=marker, capsize=3,
                        color=colour, mfc="none" if hollow else colour)
            ax.annotate(key, (x, 100 * mid), textcoords="offset points", xytext=(5, 4 - 10 * (i % 2)), fontsize=7)
            i += 1
        if legend:
            ax.plot([], [], marker, color="grey", label=label)
    ax.axhline(100 * criteria["margin"], ls="--", lw=0.8, color="grey")
    ax.axvline(criteria["size_limit_bytes"], ls=":", lw=0.8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per user (fp16 file; in-context at 1)")
    ax.set_ylabel("own vs best other user's, % lower ppl")
    if legend:
        ax.legend(fontsize=7, title=legend, title_fontsize=7)
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def pareto_plot(result: dict, path: Path, title: str, others: tuple = ()) -> Path:
    """One point per measured method of `result` (and of `others`: results of the same base, e.g. the wide part)."""
    points = [p for r in (result, *others) for p in pareto_points(r)]
    return draw_pareto([(None, False, points)], path, title, result["criteria"])


def make_plots(bet_id: str, filename: str, also: tuple = ()):
    """The Pareto plot of bet_id's result, with the points of the bets in `also` on the same base (their results)."""
    def plots(results: dict, folder: Path) -> list:
        r = results.get(bet_id)
        if r is None:
            return []
        others = tuple(results[b] for b in also if b in results and results[b]["config"]["base"] == r["config"]["base"])
        names = " + ".join([bet_id, *(b for b in also if b in results)])
        return [pareto_plot(r, folder / filename, f"{names} ({r['config']['base']}): median and range over senders",
                            others)]
    return plots


FRONTIER_COLUMNS = ("method", "lr", "bytes/user fp16 / int8", "trainable numbers", "own wins >= 5 %",
                    "own vs best other (median, range)", "own vs base (median, range)", "general (worst own)",
                    "CPU-s/adapter", "screen rule")


def frontier_rows(cells: list, criteria: dict, screen: bool, cohort: str = "chat") -> list:
    """One row per measured method (and baseline) of the cohort; the screen rule's call where it is a screen."""
    out = screen_out(cells, criteria, cohort) if screen else {}
    rows = []
    for key in measured(cells, cohort):
        s = stats(cells, cohort, key, criteria["margin"])
        leads = [p["lead"] for p in s["users"].values()]
        gains = [p["gain"] for p in s["users"].values()]
        baseline = key in BASELINES
        rows.append({"method": key, "lr": "" if baseline else f"{chosen_lr(cells, key):g}",
                     "bytes/user fp16 / int8": prefix_cost(cells, cohort, key) if baseline else
                     f"{s['bytes']:,} / {s['int8_bytes']:,}",
                     "trainable numbers": "" if baseline else f"{s['params']:,}",
                     "own wins >= 5 %": f"{sum(p['won'] for p in s['users'].values())}/{len(s['users'])}",
                     "own vs best other (median, range)": f"{_pct(s['median_lead'])} % ({_pct(min(leads))} to "
                                                           f"{_pct(max(leads))})",
                     "own vs base (median, range)": f"{_pct(statistics.median(gains))} % ({_pct(min(gains))} to "
                                                     f"{_pct(max(gains))})",
                     "general (worst own)": f"x{s['general']:.3f}" if s["general"] is not None else "",
                     "CPU-s/adapter": "" if baseline else f"{s['cpu_s']:.0f}",
                     "screen rule": ("screened out: " + out[key]) if key in out else ("kept" if screen and not baseline
                                                                                     else "")})
    return rows


def prefix_cost(cells: list, cohort: str, key: str) -> str:
    """What in-context costs instead of bytes: the user's text, prefilled before every request."""
    sizes = [c["prefix_tokens"] for c in select(cells, kind="confusion", method=key, cohort=cohort)
             if "prefix_tokens" in c]
    return (f"0 (no adapter; a {statistics.median(sizes):,.0f}-token prefix of the user's text prefilled per request, "
            "median)") if sizes else "0 (no adapter)"


def make_section(bet_id: str, plan: Plan):
    """REPORT.md's section of bet `bet_id`: its table (and, for a run in progress, a provisional Pareto plot) per
    base it ran on, from the result or from the units checkpointed so far."""
    def report_section(results_dir: Path, plots_dir: Path, root: Path) -> list:
        from sharedllm.bets.report import runs_of

        lines = []
        for run in runs_of(results_dir, bet_id):
            criteria = run.result["criteria"] if run.result else CRITERIA
            rows = frontier_rows(run.cells, criteria, plan.screen)
            if not rows:
                continue
            state = (f"**{run.result['verdict']}**" if run.result else
                     f"in progress, PROVISIONAL: {len(run.units)} units checkpointed; the screen rule and any verdict "
                     "wait for every method")
            lines += ["", f"## {bet_id} on {run.base} ({run.dtype}): {state}", "",
                      "Per method at its dev-chosen lr: the chat senders' own adapters against every other sender's "
                      "adapter of the same method and the bare base (a win: >= 5 % lower held-out ppl than every "
                      "rival); in-context: the sender's own most recent training text as a prefix, against another "
                      "sender's text as the prefix. Bytes: the own adapter's file.", "",
                      "| " + " | ".join(FRONTIER_COLUMNS) + " |", "|" + "---|" * len(FRONTIER_COLUMNS)]
            lines += ["| " + " | ".join(r[c] for c in FRONTIER_COLUMNS) + " |" for r in rows]
            if run.partial:
                Path(plots_dir).mkdir(parents=True, exist_ok=True)
                plot = pareto_plot({"cells": run.cells, "criteria": criteria},
                                   Path(plots_dir) / f"{bet_id}_{run.base}_provisional.png",
                                   f"{bet_id} ({run.base}) PROVISIONAL, {len(run.units)} units: median and range "
                                   "over senders")
                lines += ["", f"![{plot.stem}]({os.path.relpath(plot, root)})"]
        return lines
    return report_section


def make_bet(bet_id: str, plan: Plan, hypothesis: str, criteria: dict) -> Bet:
    return Bet(id=bet_id, slug=bet_id, version=1, hypothesis=hypothesis, criteria=criteria, run=make_run(plan),
               verdict=make_verdict(plan), summary=make_summary(plan), side_verdicts=side_verdicts,
               controls=controls)


FULL_CRITERIA = {**CRITERIA, "methods_run": list(VERDICT_METHODS), "split": SPLIT}
BET = make_bet("adapter_frontier", FULL, HYPOTHESIS, FULL_CRITERIA)
plots = make_plots("adapter_frontier", "adapter_frontier_pareto.png", also=("adapter_frontier_wide",))


def across_sizes_plot(results_dir: Path, plots_dir: Path, root: Path) -> list:
    """REPORT.md's frontier across sizes: one point per method and base (the screen at 135M, the full bet and its
    wide part at each larger base; finished or as far as checkpointed, marked PROVISIONAL), users' spread as bars."""
    from sharedllm.bets.report import runs_of

    series = [(f"{run.base}, {bet_id.removeprefix('adapter_frontier').strip('_') or 'full'}", run.partial,
               pareto_points({"cells": run.cells, "criteria": run.result["criteria"] if run.result else CRITERIA}))
              for bet_id in ("adapter_frontier_screen", "adapter_frontier", "adapter_frontier_wide")
              for run in runs_of(results_dir, bet_id)]
    series = [s for s in series if s[2]]
    if not series:
        return []
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    plot = draw_pareto(series, Path(plots_dir) / "adapter_frontier_across_sizes.png",
                       "the frontier across sizes: median and range over the chat senders", CRITERIA,
                       legend="base, run (hollow: PROVISIONAL)")
    return ["", "## The frontier across sizes", "",
            "Every frontier run (the screen at 135M: 6 senders, 50 steps; adapter_frontier and adapter_frontier_wide "
            "at 0.5B): one point per method and base; hollow points are from a run still in progress.", "",
            f"![{plot.stem}]({os.path.relpath(plot, root)})"]


def report_section(results_dir: Path, plots_dir: Path, root: Path) -> list:
    return make_section("adapter_frontier", FULL)(results_dir, plots_dir, root) + \
        across_sizes_plot(results_dir, plots_dir, root)

if __name__ == "__main__":
    raise SystemExit(main(BET))


# ---- README: the per-user format per size, from the finished results, by a rule fixed before they landed ----

FORMAT_SIZES = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
FLEET = 215_000
PASSING = ("STRICT_PASS", "LENIENT_PASS")
FORMAT_RULE = ("per base, every adapter format measured on the 12 chat senders (or a screen's 6) in a finished "
               "result: adapter_frontier (+ _wide) there, else the screen; chat_scale there (chat_cohort at 135M) for "
               "norm and LoRA-r4. A format is user-specific when its own confusion matrix passes (STRICT or LENIENT, "
               "the bets' per-method tiers: own >= 5 % ahead of every other sender's and the base for > 1/2 of the "
               "senders). The recommended format is the user-specific one with the fewest bytes per user (ties: the "
               "stronger tier); none passing: none is recommended")


@dataclass(frozen=True)
class Evidence:
    method: str
    tier: str
    won: str  # "k/n"
    bytes: int | None
    source: str


def frontier_evidence(result: dict, source: str) -> list:
    cells, crit = result["cells"], result["criteria"]
    out = []
    for key in (k for k in measured(cells, "chat") if k in METHODS):
        s = stats(cells, "chat", key, crit["margin"])
        out.append(Evidence(key, method_tier(cells, crit, "chat", key),
                            f"{sum(p['won'] for p in s['users'].values())}/{len(s['users'])}", s["bytes"], source))
    return out


def chat_evidence(run) -> list:
    """norm (the verdict) and LoRA-r4 (chat_scale's side verdict) of a finished chat_scale / chat_cohort run."""
    from sharedllm.bets.cells import confusion_outcomes

    from . import chat_cohort, chat_scale

    r, out = run.result, []
    lora_tier = next((v for k, v in r["side_verdicts"].items() if k.startswith("LoRA-r4")), None)
    if r["bet"] == "chat_cohort":
        conf = chat_cohort.matrix_at(r["cells"], chat_cohort.tuned_norm_lr(r["cells"]))
        outcomes = confusion_outcomes(conf, r["criteria"]["margin"])
        won = sum(w for w, _ in outcomes.values())
        return [Evidence("norm", r["verdict"], f"{won}/{len(outcomes)}", None, "chat_cohort")]
    for key, method, tier in (("norm", "norm", r["verdict"]), ("lora_r4", "lora", lora_tier)):
        numbers = chat_scale.matrix_numbers(chat_scale.matrix(r["cells"], method))
        own = [c["bytes"] for c in select(r["cells"], kind="confusion", method=method) if "bytes" in c]
        out.append(Evidence(key, tier, numbers["won"], max(own) if own else None, "chat_scale"))
    return out


def format_evidence(results_dir: Path) -> dict:
    """base -> [Evidence] from the finished results under results_dir (a run part-way gives none)."""
    from sharedllm.bets.report import runs_of

    def finished(bet_id: str) -> list:
        return [run for run in runs_of(results_dir, bet_id) if run.result and not run.result.get("incomplete")]

    found: dict = {}
    for bet_id in ("adapter_frontier", "adapter_frontier_wide"):
        for run in finished(bet_id):
            found.setdefault(run.base, []).extend(frontier_evidence(run.result, bet_id))
    for run in finished("adapter_frontier_screen"):  # the screen only where no full frontier result is
        if run.base not in found:
            found[run.base] = frontier_evidence(run.result, "the screen (6 senders, 50 steps)")
    for run in finished("chat_cohort") + finished("chat_scale"):
        found.setdefault(run.base, []).extend(chat_evidence(run))
    return found


def sizes(evidence: list) -> dict:
    """method -> bytes per user, from whichever result records them."""
    return {e.method: e.bytes for e in evidence if e.bytes}


def recommend(evidence: list) -> Evidence | None:
    """The rule (FORMAT_RULE): the user-specific format with the fewest bytes per user, else None."""
    known = sizes(evidence)
    passing = [e for e in evidence if e.tier in PASSING]
    return min(passing, key=lambda e: (known.get(e.method, math.inf), PASSING.index(e.tier)), default=None)


def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} KB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def format_line(base: str, evidence: list) -> str:
    if not evidence:
        return f"- {base}: not measured yet (no finished chat-sender result on this base)"
    known = sizes(evidence)
    best = recommend(evidence)
    seen = "; ".join(f"{e.method} {e.tier} ({e.won} win{', ' + _kb(known[e.method]) if e.method in known else ''}; "
                     f"{e.source})" for e in evidence)
    if best is None:
        return f"- {base}: **no measured per-user format is user-specific** on the chat senders: {seen}"
    size = known.get(best.method)
    cost = (f"{_kb(size)} per user, {size * FLEET / 1e9:,.1f} GB for {FLEET:,} users" if size else
            f"bytes per user not recorded in {best.source}'s result")
    return (f"- {base}: **{best.method}**, {cost} (user-specific by {best.tier}: {best.won} senders win; "
            f"{best.source}). All measured: {seen}")


def readme_section(results_dir: Path) -> list:
    """README's lines on which per-user format is user-specific at which size (the bets block), from the results."""
    found = format_evidence(results_dir)
    return ["", f"**The per-user format per size** (the rule, fixed before the frontier's results: {FORMAT_RULE}):", ""] \
        + [format_line(b, found.get(b, [])) for b in FORMAT_SIZES]
