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


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()  # seeded generators live on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate_batch(rgm: RowGainModel, prompts: list[list[int]], gains: list[Gains], max_tokens: list[int],
                   temperatures: list[float], seeds: list[int | None], eos_id: int | None) -> list[Generated]:
    """Decode every row together until each has max_tokens tokens or emitted `eos_id` (greedy at temperature 0)."""
    from transformers import DynamicCache

    stacked = rgm.stack(gains)
    ids, mask = _left_pad(prompts, rgm.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    out = [Generated([], "length") for _ in prompts]
    done = [m <= 0 for m in max_tokens]
    cache = DynamicCache()
    logits = rgm.forward(ids, stacked, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
    for _ in range(max(max_tokens, default=0)):
        nxt = []
        for b, g in enumerate(out):
            tok = 0 if done[b] else _pick(logits[b], temperatures[b], gens[b])
            if not done[b]:
                g.ids.append(tok)
                if eos_id is not None and tok == eos_id:
                    g.finish_reason, done[b] = "stop", True
                elif len(g.ids) >= max_tokens[b]:
                    done[b] = True
            nxt.append(tok)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(len(out), 1)], dim=1)
        pos = pos[:, -1:] + 1
        step = torch.tensor(nxt, dtype=torch.long, device=rgm.device)[:, None]
        logits = rgm.forward(step, stacked, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True).logits[:, -1]
    return out
