"""Personalise many users in one pass: one batch holds every user's rows, each row scaled by its own user's gains.

The model is the serving design (`sharedllm.serve.rowgains.RowGainModel`: the frozen base's weights, shared, with
every RMSNorm reading a [rows, D] gain tensor per call); here the gains of row b are user u(b)'s own trainable
vectors. The loss is the sum over users of each user's mean token loss, so the gradient that reaches user u's
gains is exactly the gradient of u's own loss (rows never interact in a causal LM forward), and every user has
their own AdamW state and hyper-parameters (one optimizer parameter group per user). Each user's batches are drawn
exactly as `sharedllm.train.train` draws them (the same `batch_sampler`, the user's own seed), so a fleet pass
gives each user the adapter that training them alone gives, up to float rounding (the GEMMs see more rows).
Norm adapters only: the row-gain design has no per-row LoRA or full fine-tuning.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .adapters import load_state
from .arch import Base
from .data import batch_sampler
from .errors import SharedLLMError
from .log import milestone, progress
from .losses import causal_lm_parts, weighted_linear_cross_entropy
from .personalise import Adapted, new_adapter, train_meta
from .serve.rowgains import RowGainModel
from .snapshot import NO_SNAPSHOT
from .train import TrainConfig, TrainResult, autocast, release_optimizer

SHARED = ("steps", "batch", "seq", "budget_s")  # fields every user of one pass must share (one batch shape)


@dataclass
class _Member:
    name: str
    cfg: TrainConfig
    batches: object
    gains: list  # one nn.Parameter per norm, in RowGainModel.names order
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


def _members(rgm: RowGainModel, tokens_by_user: dict, cfgs: dict) -> list[_Member]:
    out = []
    for user, tokens in tokens_by_user.items():
        c = cfgs[user]
        if len(tokens) < c.seq + 1:
            raise SharedLLMError(f"user {user}: {len(tokens)} training tokens, fewer than one window of {c.seq + 1}")
        gains = [torch.nn.Parameter(v.detach().clone()) for v in rgm.base_gains.vectors]
        out.append(_Member(user, c, batch_sampler(tokens, c.batch, c.seq, c.seed), gains))
    return out


def _optimizer(members: list[_Member]) -> torch.optim.AdamW:
    groups = [{"params": m.gains, "lr": m.cfg.lr, "betas": tuple(m.cfg.betas), "weight_decay": m.cfg.weight_decay}
              for m in members]
    return torch.optim.AdamW(groups)


def fleet_loss(rgm: RowGainModel, batch: torch.Tensor, row_gains: list, token_weights: torch.Tensor) -> tuple:
    """(sum of token_weights * NLL, per-token NLL) of `batch` [B, L+1] with per-row gains (one [B, D] per norm)."""
    targets = batch[:, 1:]
    with rgm.rows(row_gains) as model:
        parts = causal_lm_parts(model)
        if parts is None:  # head bias, logit scaling or soft-capping: the model's own logits
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            return (nll * token_weights).sum(), nll.detach()
        decoder, head = parts
        hidden = decoder(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    return weighted_linear_cross_entropy(hidden, head, targets, token_weights)


def _step(rgm: RowGainModel, opt, members: list[_Member], device) -> None:
    batch = torch.cat([next(m.batches) for m in members]).to(device)
    rows = batch.shape[0] // len(members)
    owner = torch.arange(len(members), device=device).repeat_interleave(rows)
    row_gains = [torch.stack([m.gains[i] for m in members]).index_select(0, owner) for i in range(len(rgm.names))]
    per_token = 1.0 / (rows * (batch.shape[1] - 1))  # each user's loss is the mean over their own tokens
    weights = torch.full(batch[:, 1:].shape, per_token, device=device)
    loss, nll = fleet_loss(rgm, batch, row_gains, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for m, user_nll in zip(members, nll.reshape(len(members), -1)):
        m.losses.append(user_nll.mean().item())


def train_fleet(base: Base, tokens_by_user: dict, cfg: TrainConfig | dict | None = None,
                label: str | None = None, dtype: str = "fp32", snapshot=NO_SNAPSHOT) -> dict[str, Adapted]:
    """Train one norm adapter per user in one pass; returns {user: Adapted}, as `personalise` would for each.

    `cfg` is one TrainConfig for everyone or {user: TrainConfig}. Users of one pass share steps, batch, seq and
    budget_s; lr, betas, weight_decay and seed are per user, so a learning-rate sweep is one pass too: give the
    same tokens under several names, each with its own lr. Batch rows = users x cfg.batch (memory grows with it).
    `dtype` is the compute dtype, as for `personalise` (bf16: the pass runs under bf16 autocast, gains and AdamW
    state stay fp32); other than fp32 it is recorded in every user's metadata. `snapshot`: as for
    `sharedllm.train.train` (resume the pass from it, keep it up to date; the caller deletes it).
    """
    if not tokens_by_user:
        raise SharedLLMError("train_fleet needs at least one user")
    cfgs = fleet_configs(list(tokens_by_user), cfg)
    first = next(iter(cfgs.values()))
    rgm = RowGainModel(base)
    members = _members(rgm, tokens_by_user, cfgs)
    opt = _optimizer(members)
    torch.manual_seed(first.seed)
    gains = [g for m in members for g in m.gains]
    done = snapshot.restore(gains, opt, [m.batches for m in members], first.steps)
    for m, losses in zip(members, done.losses):
        m.losses = losses
    rgm.model.train()
    start, cpu = time.perf_counter() - done.wall_s, time.process_time() - done.cpu_s
    with progress(total=first.steps, initial=done.step, desc=label or f"train norm, {len(members)} users",
                  unit="step") as bar, autocast(dtype, base.device), snapshot:
        for step in range(done.step, first.steps):
            if first.budget_s is not None and time.perf_counter() - start >= first.budget_s:
                break
            _step(rgm, opt, members, base.device)
            bar.update(1)
            milestone(label or "fleet", step + 1, first.steps, members[0].losses[-1])
            snapshot.after_step(step + 1, [m.losses for m in members], time.perf_counter() - start,
                                time.process_time() - cpu)
        snapshot.finish(len(members[0].losses), [m.losses for m in members], time.perf_counter() - start,
                        time.process_time() - cpu)
    release_optimizer(opt)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {m.name: _adapted(base, rgm, m, wall, cpu, dtype, done.step or None) for m in members}


def _adapted(base: Base, rgm: RowGainModel, member: _Member, wall_s: float, cpu_s: float, dtype: str,
             resumed_at: int | None = None) -> Adapted:
    adapted = new_adapter(base, "norm")
    load_state(adapted.params, dict(zip(rgm.names, (g.detach() for g in member.gains))), f"user {member.name}")
    adapted.result = TrainResult(steps=len(member.losses), wall_s=wall_s, losses=member.losses, cpu_s=cpu_s,
                                 resumed_at=resumed_at)
    adapted.meta = train_meta(member.cfg, adapted.result, dtype)
    return adapted


def with_lr(cfg: TrainConfig, lr: float) -> TrainConfig:
    """A copy of `cfg` with another learning rate (for {user: TrainConfig} sweeps)."""
    return replace(cfg, lr=lr)
