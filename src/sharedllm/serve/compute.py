"""Batched scoring and generation on a RowModel: each row is one request with its own user's adapter.

Scoring right-pads (a causal model never looks ahead, so padding after a row cannot change it); generation
left-pads with an attention mask and explicit position ids, then decodes with a KV cache, one token per step
for every row at once. `prefill` and `decode_step` are the two halves the continuous-batching scheduler uses;
`generate_batch` runs a fixed batch to the end (the reference the scheduler's tests compare with).
The engine decodes with `fastdecode.LeanDecoder` instead of `decode_step` where the architecture allows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters.rows import RowBatch, RowModel, RowState
from ..compat import cache_kwargs


@dataclass
class Scored:
    logprob: float  # summed natural-log probability of the scored tokens
    tokens: int
    # with `top` (score_batch): log p(token_t | tokens_<t) for each scored token t = 1.., and at each of those
    # positions the k most likely tokens (id, logprob), best first; None when not asked for
    token_logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


@dataclass
class Generated:
    ids: list[int]
    finish_reason: str  # "stop" (end-of-text token or a stop string) or "length"
    text: str | None = None  # the decoded text, cut before a stop string (set by the scheduler)
    # when asked for (Job.logprobs = k): one `step_logprobs` entry per token in `ids`
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


def _right_pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


@torch.inference_mode()
def score_batch(rgm: RowModel, rows: list[list[int]], gains: list[RowState],
                top: list[int | None] | None = None) -> list[Scored]:
    """Summed log p(token_t | tokens_<t) for t >= 1 of each row (the first token is the given context).
    `top[b]` = k (0..): row b also gets each token's own logprob and the k most likely tokens at each position
    (the same float32 log-softmax the sum is taken from, so the sum is unchanged)."""
    ids = _right_pad(rows, 0, rgm.device)
    logits = rgm.forward(ids, gains).logits
    out = []
    for b, row in enumerate(rows):
        n = len(row) - 1
        logp = torch.log_softmax(logits[b, :n].float(), dim=-1)
        each = logp.gather(1, ids[b, 1: n + 1, None])
        scored = Scored(logprob=each.sum().item(), tokens=n)
        k = top[b] if top is not None else None
        if k is not None:
            scored.token_logprobs = each[:, 0].tolist()
            scored.top = _top(logp, k)
        out.append(scored)
    return out


def _top(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of `logp` [T, V]: the k most likely (id, logprob), best first."""
    if k <= 0:
        return [[] for _ in range(logp.shape[0])]
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]


def step_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its logprob, the k most likely (id, logprob), best first) under log_softmax(logits) in float32: the
    model's own distribution at this step (the logits the sampler is given, before temperature and top_p)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return token, float(logp[token]), _top(logp[None], k)[0]


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None, top_p: float = 1.0) -> int:
    """Greedy at temperature 0; else sample from softmax(logits / T), restricted to the top_p nucleus if < 1."""
    if temperature <= 0:
        return int(logits.argmax())
    # Shift so the largest logit is 0 and divide in float64: any finite T > 0, even a subnormal one, gives finite
    # or -inf scores (never NaN), so a tiny T samples the argmax instead of failing the row.
    z = logits.cpu().double()  # on the CPU first: seeded generators live there, and MPS has no float64
    p64 = torch.softmax((z - z.max()) / temperature, dim=-1)
    probs = p64.float()  # the top token's probability is >= 1 / vocabulary: never 0 in float32
    if top_p < 1.0:
        probs = probs.index_put_((_outside_nucleus(p64, top_p),), torch.zeros(()))
    return int(torch.multinomial(probs, 1, generator=generator))


def _outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token ids past the smallest most-likely-first prefix whose mass reaches top_p, compared in float64 (a
    top_p such as 1e-46 or 5e-324 is 0 in float32) and never the top token: any top_p > 0 leaves a nucleus."""
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p
    outside[0] = False
    return order[outside]


pick = _pick


@torch.inference_mode()
def prefill(rgm: RowModel, prompts: list[list[int]], gains: list[RowState]):
    """Run new rows' prompts together (left-padded): (last-position logits [B, V], their KV cache, left pads)."""
    from transformers import DynamicCache

    ids, mask = _left_pad(prompts, rgm.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = rgm.forward(ids, gains, attention_mask=mask, position_ids=pos, **cache_kwargs(rgm.model, cache),
                         use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, [ids.shape[1] - len(p) for p in prompts]


@torch.inference_mode()
def decode_step(rgm: RowModel, kv, tokens: list[int], stacked: RowBatch) -> torch.Tensor:
    """One token for every row of the running batch `kv` (a BatchCache): next-token logits [B, V]."""
    mask, pos = kv.step_inputs(rgm.device)
    step = torch.tensor(tokens, dtype=torch.long, device=rgm.device)[:, None]
    return rgm.forward(step, stacked, attention_mask=mask, position_ids=pos, **cache_kwargs(rgm.model, kv.cache),
                       use_cache=True).logits[:, -1]


@torch.inference_mode()
def generate_batch(rgm: RowModel, prompts: list[list[int]], gains: list[RowState], max_tokens: list[int],
                   temperatures: list[float], seeds: list[int | None], eos_id: int | None) -> list[Generated]:
    """Decode every row together until each has max_tokens tokens or emitted `eos_id` (greedy at temperature 0)."""
    from transformers import DynamicCache

    stacked = rgm.batch(gains)
    ids, mask = _left_pad(prompts, rgm.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    out = [Generated([], "length") for _ in prompts]
    done = [m <= 0 for m in max_tokens]
    cache = DynamicCache()
    logits = rgm.forward(ids, stacked, attention_mask=mask, position_ids=pos, **cache_kwargs(rgm.model, cache),
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
        logits = rgm.forward(step, stacked, attention_mask=mask, position_ids=pos, **cache_kwargs(rgm.model, cache),
                             use_cache=True).logits[:, -1]
    return out
