"""adapter_frontier_wide: the frontier's methods that cannot carry its verdict at 0.5B, on the 12 chat senders
(issue 31, item 2; fixed 2026-12-07 with adapter_frontier's budget split, before any 0.5B frontier unit ran).

adapter_frontier's verdict is over methods whose per-user fp16 file is <= 256 KiB; at 0.5B (IA)^3 on every linear,
RoAd, VeRA, norm+(IA)^3 FFN and LoRA-r1 are over that bound by their shapes alone (bench/method_bytes.py), so they run
here, with the same code, lr grids, dev rule and matrices as adapter_frontier (that module), on the 12 chat senders
with the 3 dev senders, 100 steps and 2,048-token eval texts, the random-token control for the first 2 senders, no
clean pairs and no in-context baseline (adapter_frontier has it). Its points join adapter_frontier's Pareto plot.
The verdict: the same tiers per method, with no size bound, STRICT/LENIENT if some measured method meets them.
"""
from __future__ import annotations

from sharedllm.bets.harness import main

from .adapter_frontier import CRITERIA, SPLIT, WIDE, WIDE_METHODS, make_bet, make_plots, make_section

HYPOTHESIS = ("At 0.5B (qwen2.5-coder-0.5b), with each method's lr chosen on this base's dev slices, one of (IA)^3 on "
              "every linear, RoAd, VeRA, norm+(IA)^3 FFN or LoRA-r1 (each over 256 KiB per user there) makes each chat "
              "sender's own adapter >= 5 % lower held-out ppl than every other sender's adapter of the same method "
              "and than the bare base for >= 2/3 of the 12 chat senders, with every own adapter's general-text ppl "
              "<= 1.05x the base's.")
CRITERIA = {**CRITERIA, "methods_run": list(WIDE_METHODS), "split": SPLIT,
            "verdict_rule": "STRICT / LENIENT: some measured method meets the tier (fraction over the 12 chat senders "
                            "and general ppl bound), with no size bound; CATASTROPHIC: every measured method wins for "
                            "<= CATASTROPHIC's fraction",
            "expected": "not judged, written before running: FAIL (the screen at 135M so far: no adapter method wins for more "
                        "than 3 of its 6 senders)"}
BET = make_bet("adapter_frontier_wide", WIDE, HYPOTHESIS, CRITERIA)
plots = make_plots("adapter_frontier_wide", "adapter_frontier_wide_pareto.png")
report_section = make_section("adapter_frontier_wide", WIDE)

if __name__ == "__main__":
    raise SystemExit(main(BET))
