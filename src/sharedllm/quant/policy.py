"""The per-user compression policy: the same rule as the format choice (sharedllm.rule.judge), across the
compression schemes of one adapter of any method.

Score the user's held-out text with no adapter, the raw adapter and each candidate (every int8 and int4 scheme;
for a LoRA also rank truncations, quant/compress.candidate_specs); ship the smallest candidate whose ppl is within
`tolerance` (default 2 %) of the best of them all (raw included) AND below the no-adapter ppl; if none is (no
candidate, raw included, beats no adapter), ship the raw adapter as fp16. "Smallest" compares tensor payload
bytes (int8 and int8-delta carry the same payload; their files differ only by the scheme's name in the JSON
header), then ppl. (Until issue 32 the rule was the catalogue's "<= 1.5 x raw": lenient enough to pass an int8
that threw away half a short-trained norm adapter's gain, docs/BENCHMARKS.md "Adapter bytes per scheme".)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..rule import TOLERANCE, judge, rule_text

RAW = "float16"


@dataclass
class Candidate:
    scheme: str  # a compression spec: a scheme, or rankR+SCHEME
    bytes: int
    ppl: float
    payload: int | None = None  # tensor data bytes (defaults to the file bytes)

    def size(self) -> int:
        return self.bytes if self.payload is None else self.payload


def _fields(c: Candidate) -> dict:
    return asdict(c, dict_factory=lambda kv: {k: v for k, v in kv if v is not None})


def decide(none_ppl: float, raw: Candidate, schemes: list[Candidate], tolerance: float = TOLERANCE) -> dict:
    """The decision and the numbers behind it (a JSON-ready dict)."""
    verdict = judge([(c.scheme, c.size(), c.ppl) for c in [raw, *schemes]], none_ppl, tolerance)
    v = {r["name"]: r for r in verdict["rows"]}
    rows = []
    for c in sorted(schemes, key=lambda c: (c.size(), c.ppl, c.scheme)):
        r = v[c.scheme]
        rows.append({**_fields(c), "ppl_vs_raw": c.ppl / raw.ppl, "ppl_vs_best": r["ppl_vs_best"],
                     "within_tolerance": r["within_tolerance"], "beats_no_adapter": r["beats_base"],
                     "accepted": r["accepted"]})
    chosen = verdict["chosen"] or RAW
    raw_row = {**asdict(raw), "ppl_vs_best": v[raw.scheme]["ppl_vs_best"], "accepted": v[raw.scheme]["accepted"]}
    return {"rule": rule_text(tolerance, "no adapter") + f", else raw {RAW}", "tolerance": tolerance,
            "decision": chosen, "no_adapter_ppl": none_ppl, "best_ppl": verdict["best_ppl"], "raw": raw_row,
            "schemes": rows, **({} if verdict["chosen"] else {"note": "nothing beats no adapter: raw shipped"})}


def table(policy: dict) -> str:
    pay = lambda r: r.get("payload", r["bytes"])  # noqa: E731
    tol = 100 * policy.get("tolerance", TOLERANCE)
    lines = [f"{'scheme':20s} {'file B':>10s} {'data B':>10s} {'ppl':>10s} {'vs raw':>7s} {'vs best':>8s}  verdict",
             f"{'no adapter':20s} {'0':>10s} {'0':>10s} {policy['no_adapter_ppl']:10.3f}",
             f"{'raw ' + policy['raw']['scheme']:20s} {policy['raw']['bytes']:10,d} {pay(policy['raw']):10,d} "
             f"{policy['raw']['ppl']:10.3f} {1.0:7.3f} {policy['raw']['ppl_vs_best']:8.4f}  "
             f"{'SHIP' if policy['decision'] == RAW else ''}"]
    for r in policy["schemes"]:
        why = "SHIP" if r["scheme"] == policy["decision"] else ("ok" if r["accepted"] else
                                                                "refused: " + ", ".join(
            w for w, bad in ((f"> {tol:g} % over the best", not r["within_tolerance"]),
                             ("not better than no adapter", not r["beats_no_adapter"])) if bad))
        lines.append(f"{r['scheme']:20s} {r['bytes']:10,d} {pay(r):10,d} {r['ppl']:10.3f} {r['ppl_vs_raw']:7.3f} "
                     f"{r['ppl_vs_best']:8.4f}  {why}")
    lines.append(f"rule: {policy['rule']}" + (f" ({policy['note']})" if policy.get("note") else ""))
    return "\n".join(lines)
