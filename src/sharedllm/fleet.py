"""Personalise many users in one pass: one batch holds every user's rows, each row run with its own user's adapter.

The model is the serving design (`sharedllm.adapters.rows.RowModel`: the frozen base's weights, shared, every
RMSNorm and decoder linear reading the call's per-row adapters); here row b's adapter is user u(b)'s own trainable
tensors, packed by the method's kernel with autograd. The loss is the sum over users of each user's mean token
loss, so the gradient that reaches user u's tensors is exactly the gradient of u's own loss (rows never interact in
a causal LM forward), and every user has their own AdamW state and hyper-parameters (one optimizer parameter group
per user). Each user starts from the adapter `new_adapter` gives them alone (LoRA's random A from their own seed)
and draws their batches exactly as `sharedllm.train.train` does (the same `batch_sampler`, the user's own seed),
so a fleet pass gives each user the adapter that training them alone gives, up to float rounding (the GEMMs see
more rows). Any method with a per-row kernel (`caps.rows`: norm, LoRA) trains this way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .adapters import get_method
from .adapters.rows import RowModel
from .arch import Base
from .data import batch_sampler
from .errors import SharedLLMError
from .log import milestone, progress
from .losses import causal_lm_parts, weighted_linear_cross_entropy
from .personalise import Adapted, new_adapter, train_meta
from .snapshot import NO_SNAPSHOT
from .train import TrainConfig, TrainResult, autocast, release_optimizer

SHARED = ("steps", "batch", "seq", "budget_s")  # fields every user of one pass must share (one batch shape)


@dataclass
class _Member:
    name: str
    cfg: TrainConfig
    batches: object
    adapted: Adapted  # the user's own adapter (its parameters are what train)
    losses: list = field(default_factory=list)


def fleet_configs(users, cfg: TrainConfig | dict | None) -> dict[str, TrainConfig]:
    """One TrainConfig per user from a shared one or a {user: TrainConfig} dict; refuse mixed batch shapes."""
    cfg = cfg or TrainConfig()
    cfgs = {u: cfg for u in users} if isinstance(cfg, TrainConfig) else dict(cfg)
    missing = [u for u in users if u not in cfgs]
    if missing:
        raise SharedLLMError(f"no training config for user(s) {', '.join(map(str, missing[:3]))}")
    first = cfgs[next(iter(users))]
    for u in users:
        differ = [k for k in SHARED if getattr(cfgs[u], k) != getattr(first, k)]
        if differ:
            raise SharedLLMError(f"user {u}: {', '.join(differ)} differ from the other users'; one pass shares "
                                 f"{', '.join(SHARED)} (lr, betas, weight_decay and seed may differ)")
    return {u: cfgs[u] for u in users}


def _members(base: Base, tokens_by_user: dict, cfgs: dict, method: str, config) -> list[_Member]:
    out = []
    for user, tokens in tokens_by_user.items():
        c = cfgs[user]
        if len(tokens) < c.seq + 1:
            raise SharedLLMError(f"user {user}: {len(tokens)} training tokens, fewer than one window of {c.seq + 1}")
        adapted = new_adapter(base, method, seed=c.seed, config=config)
        out.append(_Member(user, c, batch_sampler(tokens, c.batch, c.seq, c.seed), adapted))
    return out


def _optimizer(members: list[_Member]) -> torch.optim.AdamW:
    groups = [{"params": list(m.adapted.params.values()), "lr": m.cfg.lr, "betas": tuple(m.cfg.betas),
               "weight_decay": m.cfg.weight_decay} for m in members]
    return torch.optim.AdamW(groups)


def fleet_loss(rm: RowModel, batch: torch.Tensor, rows, token_weights: torch.Tensor) -> tuple:
    """(sum of token_weights * NLL, per-token NLL) of `batch` [B, L+1], row b run with rows[b] (a RowBatch, or one
    RowState per row)."""
    targets = batch[:, 1:]
    with rm.running(rm.batch(rows)) as model:
        parts = causal_lm_parts(model)
        if parts is None:  # head bias, logit scaling or soft-capping: the model's own logits
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return (nll * token_weights).sum(), nll.detach()
        decoder, head = parts
        hidden = decoder(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    return weighted_linear_cross_entropy(hidden, head, targets, token_weights)


def _step(rm: RowModel, opt, members: list[_Member], device) -> None:
    batch = torch.cat([next(m.batches) for m in members]).to(device)
    rows = batch.shape[0] // len(members)
    states = [rm.row(m.adapted.params, m.adapted.method, m.adapted.config) for m in members]  # with autograd
    per_token = 1.0 / (rows * (batch.shape[1] - 1))  # each user's loss is the mean over their own tokens
    weights = torch.full(batch[:, 1:].shape, per_token, device=device)
    loss, nll = fleet_loss(rm, batch, [s for s in states for _ in range(rows)], weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for m, user_nll in zip(members, nll.reshape(len(members), -1)):
        m.losses.append(user_nll.mean().item())


def train_fleet(base: Base, tokens_by_user: dict, cfg: TrainConfig | dict | None = None,
                label: str | None = None, dtype: str = "fp32", snapshot=NO_SNAPSHOT, method: str = "norm",
                method_config=None) -> dict[str, Adapted]:
    """Train one adapter of `method` (any with a per-row kernel; `method_config`: its config, shared by every user)
    per user in one pass; returns {user: Adapted}, as `personalise` would for each.

    `cfg` is one TrainConfig for everyone or {user: TrainConfig}. Users of one pass share steps, batch, seq and
    budget_s; lr, betas, weight_decay and seed are per user, so a learning-rate sweep is one pass too: give the
    same tokens under several names, each with its own lr. Batch rows = users x cfg.batch (memory grows with it).
    `dtype` is the compute dtype, as for `personalise` (bf16: the pass runs under bf16 autocast, the adapters and
    AdamW state stay fp32); other than fp32 it is recorded in every user's metadata. `snapshot`: as for
    `sharedllm.train.train` (resume the pass from it, keep it up to date; the caller deletes it).
    """
    if not tokens_by_user:
        raise SharedLLMError("train_fleet needs at least one user")
    impl = get_method(method, method_config)
    if impl.caps.rows is None:
        raise SharedLLMError(f"method {method!r} has no per-row kernel: train its users one at a time")
    cfgs = fleet_configs(list(tokens_by_user), cfg)
    first = next(iter(cfgs.values()))
    rm = RowModel(base)
    members = _members(base, tokens_by_user, cfgs, method, impl.config)
    opt = _optimizer(members)
    torch.manual_seed(first.seed)
    tensors = [p for m in members for p in m.adapted.params.values()]
    done = snapshot.restore(tensors, opt, [m.batches for m in members], first.steps)
    for m, losses in zip(members, done.losses):
        m.losses = losses
    rm.model.train()
    start, cpu = time.perf_counter() - done.wall_s, time.process_time() - done.cpu_s
    with progress(total=first.steps, initial=done.step, desc=label or f"train {method}, {len(members)} users",
                  unit="step") as bar, autocast(dtype, base.device), snapshot:
        for step in range(done.step, first.steps):
            if first.budget_s is not None and time.perf_counter() - start >= first.budget_s:
                break
            _step(rm, opt, members, base.device)
            bar.update(1)
            milestone(label or "fleet", step + 1, first.steps, members[0].losses[-1])
            snapshot.after_step(step + 1, [m.losses for m in members], time.perf_counter() - start,
                                time.process_time() - cpu)
        snapshot.finish(len(members[0].losses), [m.losses for m in members], time.perf_counter() - start,
                        time.process_time() - cpu)
    release_optimizer(opt)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {m.name: _adapted(m, wall, cpu, dtype, done.step or None) for m in members}


def _adapted(member: _Member, wall_s: float, cpu_s: float, dtype: str, resumed_at: int | None = None) -> Adapted:
    adapted = member.adapted
    adapted.model.eval()
    adapted.result = TrainResult(steps=len(member.losses), wall_s=wall_s, losses=member.losses, cpu_s=cpu_s,
                                 resumed_at=resumed_at)
    adapted.meta = train_meta(member.cfg, adapted.result, dtype)
    return adapted


def with_lr(cfg: TrainConfig, lr: float) -> TrainConfig:
    """A copy of `cfg` with another learning rate (for {user: TrainConfig} sweeps)."""
    return replace(cfg, lr=lr)
