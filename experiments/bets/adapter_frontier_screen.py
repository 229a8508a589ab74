"""adapter_frontier_screen: bet adapter_frontier's screen (issue 31, item 5: "screen the frontier ... on 6 users
before running all 12; say what was screened out and why"); pre-registered 2026-12-07 with adapter_frontier, before
any unit ran.

The same methods, baselines, lr rule, verdict rule and code as adapter_frontier (that module), on the first 6 of the
12 chat senders, 50 training steps, 1,024 tokens per eval text, one dev sender (chat/sender_0f9fe1f8, one of the 6:
only its dev slice is read for the lr choice), the random-token control for the first 2 senders, no clean pairs. Run
on the default base (smollm2-135m, `sharedllm bet adapter_frontier_screen --base default`) because a 0.5B screen
does not fit a 2-core machine shared with a days-long 0.5B run: it is a SCREEN, not the verdict (the result's config
says so). Its summary lists the methods the pre-registered screen rule (criteria "screen_out") screens out.
"""
from __future__ import annotations

from sharedllm.bets.harness import main

from .adapter_frontier import CRITERIA, SCREEN, make_bet, make_plots, make_section

HYPOTHESIS = ("Screen of adapter_frontier (default base unless --base, 6 chat senders, 50 steps): some adapter method "
              "of <= 256 KiB per user (fp16 file) makes each sender's own adapter >= 5 % lower held-out ppl than "
              "every other sender's adapter of the same method and than the bare base for >= 2/3 of the 6 senders, "
              "with every own adapter's general-text ppl <= 1.05x the base's.")
CRITERIA = {**CRITERIA, "STRICT": {**CRITERIA["STRICT"], "users": len(SCREEN.chat)},
            "screen": "a screen on fewer senders and steps; the verdict is adapter_frontier's at 0.5B"}
BET = make_bet("adapter_frontier_screen", SCREEN, HYPOTHESIS, CRITERIA)
plots = make_plots("adapter_frontier_screen", "adapter_frontier_screen_pareto.png")
report_section = make_section("adapter_frontier_screen", SCREEN)

if __name__ == "__main__":
    raise SystemExit(main(BET))
