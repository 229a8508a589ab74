"""The shipping rule shared by the per-user format choice (sharedllm.choose, `adapt --method auto`) and the
compression policy (sharedllm.quant.policy, `compress --policy`), on numbers alone (no torch; it imports only
sharedllm.errors):

    best      = the lowest ppl of any candidate
    accepted  = ppl <= best x (1 + tolerance)   (inclusive: exactly at the tolerance is accepted)
                and ppl < the base's ppl        (strict: equal to the base is no gain)
    ship      = the smallest accepted candidate (size, then ppl, then name); None when none is accepted

None is accepted exactly when no candidate beats the base (the best is then no better than the base, and every
other candidate no better than the best); what each caller does then is its own (see choose.py, policy.py).
"""
from __future__ import annotations

import math

from .errors import SharedLLMError

TOLERANCE = 0.02
_SLACK = 1e-12  # relative: `best x (1 + tolerance)` computed in floats must not refuse a value exactly at it


def check_tolerance(tolerance) -> float:
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and 0 <= tolerance < 10):
        raise SharedLLMError(f"tolerance must be a fraction >= 0 (0.02 = 2 %), got {tolerance!r}")
    return float(tolerance)


def rule_text(tolerance: float, base: str = "the base") -> str:
    return (f"smallest candidate (bytes) whose ppl is within {100 * tolerance:g} % of the best candidate's "
            f"(ppl <= best x {1 + tolerance:g}) and below {base}'s ppl")


def judge(options: list[tuple[str, int, float]], base_ppl: float, tolerance: float = TOLERANCE) -> dict:
    """The rule on numbers: options (name, size, ppl) -> {"best_ppl", "chosen" (a name or None), "rows"} where
    rows are the options sorted by (size, ppl, name), each with ppl_vs_best, within_tolerance, beats_base,
    accepted. A non-finite ppl is never accepted (nor the best)."""
    tolerance = check_tolerance(tolerance)
    finite = [p for _, _, p in options if math.isfinite(p)]
    best = min(finite) if finite else math.inf
    limit = best * (1 + tolerance) * (1 + _SLACK)
    rows = []
    for name, size, ppl in sorted(options, key=lambda o: (o[1], o[2] if math.isfinite(o[2]) else math.inf, o[0])):
        within, beats = math.isfinite(ppl) and ppl <= limit, math.isfinite(ppl) and ppl < base_ppl
        rows.append({"name": name, "size": size, "ppl": ppl,
                     "ppl_vs_best": ppl / best if math.isfinite(ppl) and math.isfinite(best) and best > 0 else None,
                     "within_tolerance": within, "beats_base": beats, "accepted": within and beats})
    chosen = next((r["name"] for r in rows if r["accepted"]), None)
    return {"best_ppl": best, "chosen": chosen, "rows": rows}
