"""The per-user compression policy (the catalogue's production rule).

Score the user's held-out text with no adapter, the raw adapter and each int8 scheme; ship the smallest scheme
whose ppl is <= RATIO x the raw adapter's AND below the no-adapter ppl; otherwise ship the raw adapter as fp16.
"Smallest" compares tensor payload bytes (int8 and int8-delta carry the same payload; their files differ only by
the scheme's name in the JSON header), then ppl.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

RATIO = 1.5
RAW = "float16"


@dataclass
class Candidate:
    scheme: str
    bytes: int
    ppl: float
    payload: int | None = None  # tensor data bytes (defaults to the file bytes)

    def size(self) -> int:
        return self.bytes if self.payload is None else self.payload


def decide(none_ppl: float, raw: Candidate, schemes: list[Candidate], ratio: float = RATIO) -> dict:
    """The decision and the numbers behind it (a JSON-ready dict)."""
    rows = []
    for c in sorted(schemes, key=lambda c: (c.size(), c.ppl, c.scheme)):
        ok_raw, ok_none = c.ppl <= ratio * raw.ppl, c.ppl < none_ppl
        rows.append({**asdict(c, dict_factory=lambda kv: {k: v for k, v in kv if v is not None}), "ppl_vs_raw": c.ppl / raw.ppl, "within_ratio": ok_raw,
                     "beats_no_adapter": ok_none, "accepted": ok_raw and ok_none})
    chosen = next((r["scheme"] for r in rows if r["accepted"]), RAW)
    return {"rule": f"smallest scheme with ppl <= {ratio} x raw and ppl < no adapter, else raw {RAW}",
            "decision": chosen, "no_adapter_ppl": none_ppl, "raw": asdict(raw), "schemes": rows}


def table(policy: dict) -> str:
    pay = lambda r: r.get("payload", r["bytes"])  # noqa: E731
    lines = [f"{'scheme':14s} {'file B':>9s} {'data B':>9s} {'ppl':>10s} {'vs raw':>7s}  verdict",
             f"{'no adapter':14s} {'0':>9s} {'0':>9s} {policy['no_adapter_ppl']:10.3f}",
             f"{'raw ' + policy['raw']['scheme']:14s} {policy['raw']['bytes']:9,d} {pay(policy['raw']):9,d} "
             f"{policy['raw']['ppl']:10.3f} {1.0:7.3f}  {'SHIP' if policy['decision'] == RAW else ''}"]
    for r in policy["schemes"]:
        why = "SHIP" if r["scheme"] == policy["decision"] else ("ok" if r["accepted"] else
                                                                "refused: " + ", ".join(
            w for w, bad in (("> ratio x raw", not r["within_ratio"]),
                             ("not better than no adapter", not r["beats_no_adapter"])) if bad))
        lines.append(f"{r['scheme']:14s} {r['bytes']:9,d} {pay(r):9,d} {r['ppl']:10.3f} {r['ppl_vs_raw']:7.3f}  {why}")
    return "\n".join(lines)
