"""The bets runner: a registry of bets keyed by id, options, make-style result files, and the verdict grammar.

A bet is data plus two functions, fixed in its module before it runs:
  HYPOTHESIS, CRITERIA (STRICT / LENIENT / CATASTROPHIC rules as data),
  run(ctx) -> cells        a list of flat dicts: the condition (user, method, seed, text...) and what was measured,
  verdict(cells, criteria) a pure function, so every committed verdict can be recomputed from its JSON alone.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from sharedllm.atomic import write_text_atomic
from sharedllm.log import say
from sharedllm.errors import SharedLLMError

from .catalogue import current
from .spec import (NOT_RUN, VERDICTS, Bet, MissingDependency, Options, get_bet, grade,  # noqa: F401 - re-exported
                   grade_users, not_run)


def result_path(bet: Bet, opts: Options) -> Path:
    return opts.result_dir() / f"{bet.name}.json"


def check_options(bet: Bet, opts: Options) -> None:
    given = {"users": opts.users is not None, "seeds": opts.seeds is not None, "full_ft": opts.full_ft,
             "ternary": opts.ternary is not None, "random_users": opts.random_users is not None,
             "eval_len": opts.eval_len is not None}
    bad = [k for k, v in given.items() if v and k not in bet.accepts]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise SharedLLMError(f"bet {bet.name} does not take {flags} (its conditions are fixed in its module)")


def run_bet(bet: Bet, opts: Options) -> dict:
    """Run a bet (or reuse its result file, a make-style target) and return the result dict."""
    check_options(bet, opts)
    path = result_path(bet, opts)
    if path.is_file() and not opts.force:
        result = json.loads(path.read_text())
        if not result.get("incomplete"):
            result["reused"] = str(path)
            return result
        say(f"{path}: incomplete ({len(result['incomplete']['missing'])} unit(s) missing); running them")
    from .context import Context

    start, threads = time.time(), torch.get_num_threads()
    if opts.quick:  # tiny matmuls: one thread avoids OpenMP spin contention on a busy machine
        torch.set_num_threads(1)
    ctx = Context(bet, opts)
    try:
        cells, missing = run_units(bet, ctx)
    finally:
        ctx.cache.flush()
        torch.set_num_threads(threads)
    result = assemble(bet, ctx, cells, time.time() - start, missing)
    write_text_atomic(path, json.dumps(result, indent=1, default=float) + "\n")
    if not missing:
        ctx.checkpoint.remove()  # every unit is in the result now
    result["written"] = str(path)
    return result


def run_units(bet: Bet, ctx) -> tuple[list, list]:
    """The bet's cells and the units missing from them. Sequential: run() computes each unit in turn (a unit that
    raises stops the run; the checkpoint keeps the others). On Ray: run() enumerates the units the checkpoint
    lacks (`pending`), the driver feeds them to Ray in the bet's order and enumerates again as each lands (a unit
    that waits on others, a tuned lr or a fleet of adapters, starts as soon as they are done), and a last run()
    assembles the cells from the checkpoint."""
    if ctx.opts.ray is None:
        return bet.run(ctx), []
    from .ray_units import dispatch

    def pending() -> list:
        ctx.deferred = []
        bet.run(ctx)
        return list(dict.fromkeys(ctx.deferred))

    dispatch(bet, ctx.opts, pending, ctx.checkpoint)
    ctx.deferred = []
    cells = bet.run(ctx)  # the cells from the checkpoint; still deferred: units that failed and those waiting on them
    return cells, list(dict.fromkeys(ctx.deferred))


def assemble(bet: Bet, ctx, cells: list, wall_s: float, missing: list = ()) -> dict:
    verdict, summary = judge(bet, cells, bool(missing))
    result = {"bet": bet.id, "slug": bet.slug, "version": bet.version, "hypothesis": bet.hypothesis,
              "criteria": bet.criteria, "config": ctx.config(), "cells": cells,
              "verdict": verdict, "summary": summary, "extras": ctx.extras, "meta": meta(wall_s, ctx.opts)}
    if missing:  # listed, never invented: the verdict is over the completed units' cells only
        failed = ctx.checkpoint.failed()
        result["incomplete"] = {"missing": missing, "failed": {k: failed[k] for k in missing if k in failed},
                                "units_done": len(ctx.checkpoint.reused) + len(ctx.checkpoint.computed)}
    machines = Counter(u.get("machine", "not recorded") for u in ctx.checkpoint.units().values())
    if machines:  # where the units ran: a run resumed elsewhere has more than one
        result["meta"]["unit_machines"] = dict(machines)
    if ctx.checkpoint.reused:  # a resumed run: say how much of it came from the checkpoint of earlier runs
        result["meta"]["resumed"] = {"units_reused": len(ctx.checkpoint.reused),
                                     "wall_s_all_units": round(ctx.checkpoint.wall_s(), 1)}
    if ctx.opts.ray is not None:
        units = ctx.checkpoint.units()
        result["meta"]["ray"] = {"address": ctx.opts.ray, "units_computed": len(ctx.checkpoint.computed),
                                 "unit_wall_s_sum": round(sum(units[k].get("wall_s", 0.0) for k in units
                                                              if k in ctx.checkpoint.computed), 1)}
    if bet.side_verdicts is not None and not missing:
        result["side_verdicts"] = bet.side_verdicts(cells, bet.criteria)
    result["control_verdicts"] = bet.controls(cells, bet.criteria) if bet.controls is not None and not missing else {}
    assert result["verdict"] in VERDICTS + ("INCOMPLETE",) * bool(missing), result["verdict"]
    return result


def judge(bet: Bet, cells: list, incomplete: bool) -> tuple[str, str]:
    """Verdict and summary. With units missing, each is computed from the completed units' cells where the bet's
    rules allow it; where they do not, the verdict is INCOMPLETE and the summary says why."""
    return (_or_incomplete(lambda: bet.verdict(cells, bet.criteria), incomplete, "INCOMPLETE"),
            _or_incomplete(lambda: bet.summary(cells), incomplete, "no summary from the completed units alone"))


def _or_incomplete(compute: Callable, incomplete: bool, fallback: str) -> str:
    try:
        return compute()
    except Exception as e:  # noqa: BLE001 - only for an incomplete run; a complete one re-raises
        if not incomplete:
            raise
        return fallback if fallback == "INCOMPLETE" else f"{fallback} ({type(e).__name__}: {e})"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=current().path, capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def meta(wall_s: float, opts: Options) -> dict:
    import peft
    import torch
    import transformers

    import sharedllm

    device = opts.device
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--", ".", ":/src")),
            "packages": {"sharedllm": sharedllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpus": _cpus(), "threads": torch.get_num_threads(), "device": device},
            "wall_s": round(wall_s, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": opts.quick}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def render(result: dict) -> str:
    where = result.get("written") or f"{result.get('reused')} (reused; --force re-runs)"
    lines = [f"bet {result['bet']} {result['slug']}: {result['verdict']}", f"  {result['summary']}"]
    if result.get("incomplete"):
        inc = result["incomplete"]
        lines.append(f"  INCOMPLETE: {len(inc['missing'])} unit(s) missing, verdict over the completed units only; "
                     f"failed: {inc['failed'] or 'none'} (running it again retries them)")
    for name, v in (result.get("side_verdicts") or {}).items():
        lines.append(f"  side verdict {name}: {v}")
    for name, v in (result.get("control_verdicts") or {}).items():
        lines.append(f"  control {name}: {v}")
    lines.append(f"  result {where}  ({result['meta']['wall_s']} s)")
    return "\n".join(lines)


def main(bet: Bet, argv=None) -> int:
    """`python -m experiments.bets.<module>`: the same as `sharedllm bet <id>` (its options and output)."""
    import sys

    from sharedllm.cli import main as cli_main

    return cli_main(["bet", bet.id, *(sys.argv[1:] if argv is None else argv)])
