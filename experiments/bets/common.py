"""What several bets share: the users the small bets run on, and training one adapter then scoring it."""
from __future__ import annotations

from pathlib import Path

USERS = {"programmer": "programmer/cpython_asyncio", "novelist": "novelist/austen_pride_and_prejudice",
         "scientist": "scientist/arxiv_astro_ph"}  # files under the corpora folder, without .txt


def adapter_cells(ctx, rel: str, method: str, curve: str, cell, on: list | None = None, seed: int = 0,
                  lr: float | None = None) -> list:
    """Train (or reuse) user `rel`'s `method` adapter at (seed, lr), record its loss curve under `curve`, and score
    it on the eval texts of every user in `on` (default: `rel` alone); `cell(user, path, sidecar)` gives the fields
    naming that user's cells (in order). A confusion row scores one adapter on every user; a method cell on its own.
    The adapted model is released afterwards."""
    path = ctx.adapter(rel, method, seed=seed, lr=lr)
    side = ctx.curve(curve, path)
    cells = []
    for u in [rel] if on is None else on:
        cells += ctx.score_cells(path, u, **cell(u, path, side))
    ctx.release()
    return cells


def footprint(path: Path, side: dict) -> dict:
    """The adapter file's bytes and its training wall seconds (from the sidecar), as cells record them."""
    return {"bytes": Path(path).stat().st_size, "train_s": round(side["wall_s"], 1)}


def in_fleets(ctx, label: str, users: list, unit_key, name, **train) -> list:
    """Train the norm adapters of `users` (--fleet users per pass, in their order) as fleet units before the units
    that score them (`unit_key(user)`); `train` gives ctx.adapter's arguments (seed, lr, tag, tokens: a value, or a
    function of the user, called only when that pass runs). Returns the users whose scoring units may run now."""
    ready, size = [], ctx.opts.fleet
    for i in range(0, len(users), size):
        group = users[i:i + size]
        needed = [ctx.checkpoint.get(unit_key(u)) is None for u in group]
        key = f"fleet/{label}/" + "+".join(name(u) for u in group)
        if ctx.train_together(key, [{"rel": u, **train} for u in group], needed):
            ready += group
    return ready
