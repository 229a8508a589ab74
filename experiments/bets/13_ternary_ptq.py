"""Bet 13: ternary post-training quantisation of the base keeps it usable."""
from __future__ import annotations

import json

from sharedllm.base import load_base
from sharedllm.bets.cells import fmt, one, ppl, values
from sharedllm.bets.common import GENERAL
from sharedllm.bets.harness import Bet, grade, main

HYPOTHESIS = ("Ternary PTQ of the base (the best method of `sharedllm quantize`) gives a base file <= 1/8 of the "
              "fp16 base's size with general-text ppl <= 1.5x the full-precision base.")
DEV_TEXT = 0  # the ternary method and repair steps were chosen on general ppl over this eval text
CRITERIA = {
    "measure": "size ratio = ternary base file bytes / (fp16 bytes of every base parameter); ppl ratio = "
               "ternary general-text ppl / full-precision general-text ppl, pooled over the judged eval texts",
    "dev_text": DEV_TEXT,
    "dev_text_why": "eval text 0 is the first 2,048 held-out general tokens, on which `sharedllm quantize`'s method "
                    "and repair steps were chosen (docs/LOG.md, issue 3): development text, not evidence",
    "judged_texts": "every eval text except dev_text (2 of 3); STRICT needs both",
    "STRICT": {"max_size_ratio": 1 / 8, "max_ppl_ratio": 1.5}, "LENIENT": {"max_ppl_ratio": 3.0},
    "CATASTROPHIC": {"min_ppl_ratio": 10.0},
}
JUDGED_TEXTS = 2
# Reported beside the verdict (not judged: the hypothesis is about general text): the same ratio on a code and a
# prose user's eval texts, neither of which took part in choosing the quantize method or its calibration.
DOMAINS = {"code": "programmer/cpython_asyncio", "prose": "novelist/austen_pride_and_prejudice"}


def fp16_bytes(model) -> int:
    return 2 * sum(p.numel() for p in model.parameters())


def run(ctx) -> list:
    path = ctx.ternary_file()
    tbase = load_base(str(path), ctx.opts.device)
    side = path.with_suffix(".json")
    info = json.loads(side.read_text()) if side.is_file() else {}
    ctx.extras["quantize"] = info
    ctx.notes.update({"ternary_fingerprint": tbase.fingerprint, "ternary_method": tbase.meta.get("method"),
                      "ternary_source_fingerprint": tbase.meta.get("source_fingerprint")})
    fp_bytes, t_bytes = fp16_bytes(ctx.base.model), path.stat().st_size
    cells = ctx.score_cells(None, GENERAL, condition="fp", bytes=fp_bytes)
    bits = tbase.meta.get("bits_per_weight")
    tctx = ctx.rebased(tbase)
    cells += tctx.score_cells(None, GENERAL, condition="ternary", bytes=t_bytes,
                              bits_per_weight=bits, method=tbase.meta.get("method"))
    for domain, user in DOMAINS.items():
        cells += ctx.score_cells(None, user, condition="fp", domain=domain, user=user)
        cells += tctx.score_cells(None, user, condition="ternary", domain=domain, user=user)
    return cells


def general(cells: list) -> list:
    """The general-text cells (the hypothesis's); the code and prose cells carry a `domain`."""
    return [c for c in cells if "domain" not in c]


def domain_ratios(cells: list) -> dict:
    """Ternary / fp ppl per domain (code, prose), pooled over its eval texts; empty for results before 2026-11-30."""
    return {d: ppl(cells, condition="ternary", domain=d) / ppl(cells, condition="fp", domain=d)
            for d in values(cells, "domain", condition="fp")}


def judged(cells: list, criteria: dict) -> list:
    return [c for c in general(cells) if c.get("text") != criteria["dev_text"]]


def ratios(cells: list) -> tuple[float, float]:
    size = one(cells, "bytes", condition="ternary") / one(cells, "bytes", condition="fp")
    return size, ppl(cells, condition="ternary") / ppl(cells, condition="fp")


def text_ratios(cells: list) -> dict:
    cells = general(cells)
    return {t: ppl(cells, condition="ternary", text=t) / ppl(cells, condition="fp", text=t)
            for t in values(cells, "text", condition="fp")}


def verdict(cells: list, criteria: dict) -> str:
    """Judged on the eval texts other than the development text; fewer judged texts than declared: not STRICT."""
    mine = judged(cells, criteria)
    size, r = ratios(mine)
    s, n = criteria["STRICT"], min(len(values(mine, "text", condition=x)) for x in ("fp", "ternary"))
    return grade(size <= s["max_size_ratio"] and r <= s["max_ppl_ratio"] and n >= JUDGED_TEXTS,
                 r <= criteria["LENIENT"]["max_ppl_ratio"], r > criteria["CATASTROPHIC"]["min_ppl_ratio"])


def summary(cells: list) -> str:
    mine = judged(cells, CRITERIA)
    size, r = ratios(mine)
    per = " / ".join(f"{x:.2f}" + (" (dev)" if t == DEV_TEXT else "") for t, x in text_ratios(cells).items())
    return (f"general ppl on the judged texts fp {fmt(ppl(mine, condition='fp'))} -> ternary "
            f"{fmt(ppl(mine, condition='ternary'))} ({r:.2f}x); ternary/fp per eval text {per}; all 3 pooled "
            f"{ratios(general(cells))[1]:.2f}x; file {one(cells, 'bytes', condition='ternary'):,} bytes = {size:.3f} "
            f"of fp16; decoder bits/weight {one(cells, 'bits_per_weight', condition='ternary'):.3f}"
            + "".join(f"; {d} ({DOMAINS[d]}) ternary/fp {x:.2f}x" for d, x in domain_ratios(cells).items()))


BET = Bet(id="13", slug="ternary_ptq", version=2, hypothesis=HYPOTHESIS, criteria=CRITERIA, run=run,
          verdict=verdict, summary=summary, accepts=("ternary",))

if __name__ == "__main__":
    raise SystemExit(main(BET))
