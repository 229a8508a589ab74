"""The bet runtime: Bet and Options (harness), what a running bet sees (context), cell helpers (cells), model
probes (probes), units on Ray (ray_units), REPORT.md and plots (report), and where the bets are (catalogue).

The bet definitions and their committed results are not part of the package: they live in a bets dir (in this
repository `experiments/bets/`) that the catalogue loads by path (`--bets-dir DIR`)."""
