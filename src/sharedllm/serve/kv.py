"""The KV cache of the rows being decoded, as one left-padded batch that rows join and leave between steps.

Row b's real positions are columns [pads[b], width) of every layer's keys and values; the columns before are
padding the attention mask hides. A joining group (prefilled on its own, left-padded to its own width) is
aligned with the running batch by padding whichever is narrower on the left; leaving rows are removed with an
index select, then columns that are padding for every remaining row are cut. Each row keeps its own past length
(`lengths`), so its position ids and mask are exactly those it would have alone.
"""
from __future__ import annotations

import torch


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)


class BatchCache:
    def __init__(self):
        self.cache = None  # a transformers DynamicCache, or None while no row is active
        self.pads: list[int] = []

    def __len__(self) -> int:
        return len(self.pads)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None and self.pads else 0

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (0 once every row has left)."""
        if self.cache is None:
            return 0
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))

    @property
    def lengths(self) -> list[int]:
        return [self.width - p for p in self.pads]

    def step_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask over the cache plus the one new token, position id of that token) for every row."""
        cols = torch.arange(self.width + 1, device=device)
        pads = torch.tensor(self.pads, device=device)
        mask = (cols[None, :] >= pads[:, None]).long()
        pos = torch.tensor(self.lengths, device=device)[:, None]
        return mask, pos

    def join(self, cache, pads: list[int]) -> None:
        """Append rows prefilled together in `cache` (their own left pads `pads`) to the running batch."""
        if not self.pads:
            self.cache, self.pads = cache, list(pads)
            return
        w_old, w_new = self.width, cache.get_seq_length()
        w = max(w_old, w_new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, w - w_old), _pad_left(theirs.keys, w - w_new)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, w - w_old), _pad_left(theirs.values, w - w_new)], dim=0)
        self.pads = [p + w - w_old for p in self.pads] + [p + w - w_new for p in pads]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current batch, in order) and cut all-padding columns."""
        if len(rows) == len(self.pads):
            return
        if not rows:
            self.cache, self.pads = None, []
            return
        self.cache.batch_select_indices(torch.tensor(rows, device=self.cache.layers[0].keys.device))
        pads = [self.pads[i] for i in rows]
        cut = min(pads)
        if cut:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        self.pads = [p - cut for p in pads]
