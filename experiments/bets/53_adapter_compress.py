"""Bet 53: int8 compression of norm adapters keeps their gain."""
from __future__ import annotations

from pathlib import Path

from sharedllm.atomic import write_bytes_atomic
from sharedllm.bets.cells import fmt, one, ppl, select, values
from sharedllm.bets.harness import Bet, grade, main, not_run
from sharedllm.personalise import load_adapted
from sharedllm.quant.compress import encode_adapter

from .common import USERS

SCHEMES = ("int8", "int8-channel", "int8-delta")
HYPOTHESIS = ("Per-tensor symmetric int8 (scale = max|w| / 127) of a norm-only adapter keeps held-out ppl within "
              "1.5x of the raw fp16 adapter for every user.")
CRITERIA = {
    "scheme": "int8", "ratio": "ppl(scheme) / ppl(raw fp16 adapter), user's 3 eval texts pooled",
    "STRICT": {"max_ratio": 1.5, "min_users": 3}, "LENIENT": {"max_ratio": 2.0, "min_users": 2},
    "CATASTROPHIC": {"rule": "ppl(scheme) > ppl(no adapter)", "min_users": 2},
}


def run(ctx) -> list:
    cells = []
    for user, rel in USERS.items():
        raw = ctx.adapter(rel, "norm")
        cells += ctx.score_cells(None, rel, user=user, scheme="none", bytes=0)
        cells += ctx.score_cells(raw, rel, user=user, scheme="float16", bytes=raw.stat().st_size)
        for scheme in SCHEMES:
            out = raw.with_name(raw.stem + f"__{scheme}.safetensors")
            if not out.is_file() or ctx.opts.force:
                compress(ctx.base, raw, scheme, out)
            cells += ctx.score_cells(out, rel, user=user, scheme=scheme, bytes=out.stat().st_size)
        ctx.release()
    return cells


def compress(base, raw: Path, scheme: str, out: Path) -> None:
    """What `sharedllm compress --scheme` does: re-encode, check the result loads on this base, write atomically."""
    data = encode_adapter(base, load_adapted(base, raw), scheme)
    load_adapted(base, data=data, source=str(out))
    write_bytes_atomic(out, data)


def counts(cells: list, criteria: dict) -> tuple[int, int, int]:
    s = criteria["scheme"]
    strict = lenient = catas = 0
    for u in values(cells, "user"):
        q, raw, none = (ppl(cells, user=u, scheme=x) for x in (s, "float16", "none"))
        strict += q / raw <= criteria["STRICT"]["max_ratio"]
        lenient += q / raw <= criteria["LENIENT"]["max_ratio"]
        catas += q > none
    return strict, lenient, catas


def verdict(cells: list, criteria: dict) -> str:
    strict, lenient, catas = counts(cells, criteria)
    return grade(strict >= criteria["STRICT"]["min_users"], lenient >= criteria["LENIENT"]["min_users"],
                 catas >= criteria["CATASTROPHIC"]["min_users"])


def side_verdicts(cells: list, criteria: dict) -> dict:
    """The same criteria applied to the other schemes (reported beside the catalogue scheme's verdict)."""
    return {s: verdict(cells, {**criteria, "scheme": s}) for s in SCHEMES if s != criteria["scheme"]}


def controls(cells: list, criteria: dict) -> dict:
    """Judged in the scheme's place: the bare base (0 bytes), and a file of the scheme's size that decodes to the
    base's own gains (int8-delta of a zero delta: its ppl is the base's, its bytes the scheme's file's)."""
    base = select(cells, scheme="none")
    if not base:
        return {"bare base": not_run("no base cells, scheme none")}
    s, size = criteria["scheme"], {u: one(cells, "bytes", user=u, scheme=criteria["scheme"]) for u in values(cells, "user")}
    gains = [{**c, "scheme": "base_gains", "bytes": size[c["user"]]} for c in base]
    return {"bare base": verdict(cells, {**criteria, "scheme": "none"}),
            f"{s} file of the base's own gains": verdict(cells + gains, {**criteria, "scheme": "base_gains"})}


def summary(cells: list) -> str:
    users = values(cells, "user")
    parts = []
    for u in users:
        row = "/".join(fmt(ppl(cells, user=u, scheme=s)) for s in ("none", "float16") + SCHEMES)
        parts.append(f"{u} ppl none/fp16/{'/'.join(SCHEMES)} {row}")
    sizes = "/".join(f"{one(cells, 'bytes', user=users[0], scheme=s):,}" for s in ("float16",) + SCHEMES)
    return "; ".join(parts) + f"; bytes fp16/{'/'.join(SCHEMES)} {sizes}"


BET = Bet(id="53", slug="adapter_compress", version=1, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, side_verdicts=side_verdicts,
          controls=controls)

if __name__ == "__main__":
    raise SystemExit(main(BET))
