"""Batched scoring and generation on a RowGainModel: each row is one request with its own user's gains.

Scoring right-pads (a causal model never looks ahead, so padding after a row cannot change it); generation
left-pads with an attention mask and explicit position ids, then decodes with a KV cache, one token per step
for every row at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rowgains import Gains, RowGainModel


@dataclass
class Scored:
    logprob: float  # summed natural-log probability of the scored tokens
    tokens: int


@dataclass
class Generated:
    ids: list[int]
    finish_reason: str  # "stop" (end-of-text token) or "length"


def _right_pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


@torch.inference_mode()
def score_batch(rgm: RowGainModel, rows: list[list[int]], gains: list[Gains]) -> list[Scored]:
    """Summed log p(token_t | tokens_<t) for t >= 1 of each row (the first token is the given context)."""
    ids = _right_pad(rows, 0, rgm.device)
    logits = rgm.forward(ids, gains).logits
    out = []
    for b, row in enumerate(rows):
        n = len(row) - 1
        logp = torch.log_softmax(logits[b, :n].float(), dim=-1)
        picked = logp.gather(1, ids[b, 1: n + 1, None]).sum().item()
        out.append(Scored(logprob=picked, tokens=n))
    return out


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None, top_p: float = 1.0) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()  # seeded generators live on the CPU
    if top_p < 1.0:  # nucleus: keep the most likely tokens whose mass reaches top_p (at least one)
        p, order = probs.sort(descending=True)
        drop = p.cumsum(0) - p >= top_p
        probs = torch.zeros_like(probs).scatter(0, order, p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoding:
    """Rows decoded together, one token per `step()`; rows can leave between steps (`keep`), so a finished or
    cancelled row costs nothing afterwards. Each row's sampling (its seed, its temperature) is its own."""

    @torch.inference_mode()
    def __init__(self, rgm: RowGainModel, prompts: list[list[int]], gains: list[Gains], max_tokens: list[int],
                 temperatures: list[float], seeds: list[int | None], eos_id: int | None,
                 top_ps: list[float] | None = None):
        from transformers import DynamicCache

        self.rgm, self.eos_id = rgm, eos_id
        self.top_ps = list(top_ps) if top_ps is not None else [1.0] * len(prompts)
        self.max_tokens, self.temperatures = list(max_tokens), list(temperatures)
        self.gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
        self.out = [Generated([], "length") for _ in prompts]
        self.stacked = rgm.stack(gains)
        ids, self.mask = _left_pad(prompts, rgm.device)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.logits = rgm.forward(ids, self.stacked, attention_mask=self.mask, position_ids=self.pos,
                                  past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def __len__(self) -> int:
        return len(self.out)

    def pick(self) -> list[bool]:
        """Sample one token for every row from the current logits; -> which rows are now finished."""
        done = []
        for b, g in enumerate(self.out):
            tok = _pick(self.logits[b], self.temperatures[b], self.gens[b], self.top_ps[b])
            g.ids.append(tok)
            if self.eos_id is not None and tok == self.eos_id:
                g.finish_reason = "stop"
            done.append(g.finish_reason == "stop" or len(g.ids) >= self.max_tokens[b])
        return done

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Go on with these rows only (indices into the current rows, in order)."""
        if rows == list(range(len(self.out))):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.rgm.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.logits = self.mask[idx], self.pos[idx], self.logits[idx]
        self.stacked = [s[idx] for s in self.stacked]
        for name in ("max_tokens", "temperatures", "top_ps", "gens", "out"):
            setattr(self, name, [getattr(self, name)[i] for i in rows])

    @torch.inference_mode()
    def forward(self) -> None:
        """Feed every row's last picked token through the model (one decode step)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.out), 1)], dim=1)
        self.pos = self.pos[:, -1:] + 1
        step = torch.tensor([g.ids[-1] for g in self.out], dtype=torch.long, device=self.rgm.device)[:, None]
        self.logits = self.rgm.forward(step, self.stacked, attention_mask=self.mask, position_ids=self.pos,
                                       past_key_values=self.cache, use_cache=True).logits[:, -1]


def generate_batch(rgm: RowGainModel, prompts: list[list[int]], gains: list[Gains], max_tokens: list[int],
                   temperatures: list[float], seeds: list[int | None], eos_id: int | None) -> list[Generated]:
    """Decode every row together until each has max_tokens tokens or emitted `eos_id` (greedy at temperature 0)."""
    d = Decoding(rgm, prompts, gains, max_tokens, temperatures, seeds, eos_id)
    results = list(d.out)
    while len(d):
        done = d.pick()
        d.keep([b for b, x in enumerate(done) if not x])
        if len(d):
            d.forward()
    return results
