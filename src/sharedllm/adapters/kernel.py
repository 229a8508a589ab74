"""Pieces shared by the per-row kernels (the contract of adapters/rows.py) of methods that change only the outputs
of decoder linears (LoRA, (IA)^3, VeRA, LoRA-XS, RoAd)."""
from __future__ import annotations

import torch


class LinearRows:
    """Base of a kernel that changes only decoder linears: no RMSNorm gain, and a site is touched when the batch's
    view has entries for it."""

    def gain(self, view, index: int):
        return None

    def touches(self, view, site: str) -> bool:
        return site in view


def row_groups(states: list, key, device) -> list:
    """The batch's rows that carry a state of this method (None: a row without it), grouped by `key(state)` in order
    of first appearance -> [(key, row indices [b'] on `device`, their states, are they every row, in order?)]."""
    groups: dict = {}
    for i, st in enumerate(states):
        if st is not None:
            groups.setdefault(key(st), []).append((i, st))
    out = []
    for k, members in groups.items():
        rows = [i for i, _ in members]
        out.append((k, torch.tensor(rows, device=device), [st for _, st in members], rows == list(range(len(states)))))
    return out
