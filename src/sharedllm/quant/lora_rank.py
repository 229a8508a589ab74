"""Rank truncation of a LoRA adapter (`sharedllm compress --rank R'`).

Per site the LoRA's change is D = s B A (B [N, r], A [r, K], s = alpha / r). With B = Qb Rb and A^T = Qa Ra
(thin QR), D = Qb (s Rb Ra^T) Qa^T, so the SVD of the r x r core, U S V^T, gives D's: D = (Qb U) S (Qa V)^T.
Keeping the r' largest singular values is the best rank-r' approximation of D in Frobenius and spectral norm
(Eckart-Young); it is refactored into an ordinary LoRA of rank r':

    A' = sqrt(S') (Qa V')^T            [r', K]
    B' = (Qb U') sqrt(S') / s'         [N, r']      s' = alpha' / r',  alpha' = max(1, round(s r'))

so s' B' A' is that approximation exactly (up to float rounding), whatever alpha' is. alpha' keeps the scale s
itself whenever s r' is a whole number (the default alpha 8 = 2 x rank 4: every r'); LoraConfig.alpha is an
integer, so otherwise the nearest one is taken and B' absorbs the difference. The balanced split sqrt(S) keeps
A' and B' of similar magnitude (fp16 and int4 both like that). Truncating to r' = r re-factors D without loss.
"""
from __future__ import annotations

import dataclasses

import torch

from ..adapters import adapter_state, load_state
from ..adapters.lora import A_KEY, B_KEY, LoraConfig  # noqa: F401  (A_KEY, B_KEY: re-exported)
from ..errors import SharedLLMError



def truncatable(adapted) -> bool:
    """Is this a LoRA adapter (a config with a rank to truncate)?"""
    return isinstance(adapted.config, LoraConfig)


def truncated_config(config: LoraConfig, rank: int) -> LoraConfig:
    scale = config.alpha / config.rank
    return dataclasses.replace(config, rank=rank, alpha=max(1, round(scale * rank)))


@torch.no_grad()
def truncate_site(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int, new_scale: float):
    """(A [r, K], B [N, r]) of change scale B A -> (A' [rank, K], B' [rank ...], singular values of the change)."""
    a64, b64 = a.double(), b.double()
    qb, rb = torch.linalg.qr(b64)  # [N, r], [r, r]
    qa, ra = torch.linalg.qr(a64.t())  # [K, r], [r, r]
    u, s, vh = torch.linalg.svd(scale * rb @ ra.t())
    root = s[:rank].sqrt()
    a_new = root[:, None] * (qa @ vh[:rank].t()).t()
    b_new = (qb @ u[:, :rank]) * root[None, :] / new_scale
    return a_new.float(), b_new.float(), s


def truncate_named(named: dict, config: LoraConfig, rank: int) -> tuple[dict, LoraConfig, dict]:
    """A LoRA's named tensors (PEFT names, sharedllm.adapters.lora) truncated to `rank` (1 <= rank <= config.rank)
    -> (named tensors of rank `rank`, its config, a report: per site the relative Frobenius error of the change)."""
    if not (isinstance(rank, int) and 1 <= rank <= config.rank):
        raise SharedLLMError(f"--rank {rank}: a LoRA of rank {config.rank} truncates to a rank in 1..{config.rank}")
    new = truncated_config(config, rank)
    scale, new_scale = config.alpha / config.rank, new.alpha / new.rank
    out, errors = {}, {}
    for name, a in named.items():
        if not name.endswith(A_KEY):
            continue
        site = name[: -len(A_KEY)]
        b = named.get(site + B_KEY)
        if b is None:
            raise SharedLLMError(f"LoRA tensor {name[:60]!r} has no lora_B")
        a_new, b_new, s = truncate_site(a, b, scale, rank, new_scale)
        out[name], out[site + B_KEY] = a_new, b_new
        total = float(s.pow(2).sum())
        errors[site] = (float(s[rank:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    if len(out) != len(named):
        raise SharedLLMError("LoRA adapter: every lora_A needs its lora_B (and nothing else)")
    worst = max(errors.values(), default=0.0)
    report = {"rank": config.rank, "alpha": config.alpha,
              "rel_error_max": round(worst, 6), "rel_error_mean": round(sum(errors.values()) / max(1, len(errors)), 6)}
    return out, new, report


def truncated(base, adapted, rank: int):
    """A loaded LoRA `Adapted` -> a new `Adapted` of rank `rank` on the same base (its meta: the old one with
    method_config updated and `truncated_from` recording the rank and alpha it came from, and the error)."""
    from ..adapters import config_to_json
    from ..personalise import new_adapter

    if not truncatable(adapted):
        raise SharedLLMError(f"--rank truncates LoRA adapters; this one is {adapted.method!r}")
    named, config, report = truncate_named(adapter_state(adapted.params), adapted.config, rank)
    out = new_adapter(base, adapted.method, config=config)
    load_state(out.params, named, "rank truncation")
    meta = dict(adapted.meta or {})
    earlier = meta.get("truncated_from")  # truncating twice: the original rank and alpha (the error: this step's)
    if isinstance(earlier, dict) and isinstance(earlier.get("rank"), int):
        report = {**report, "rank": earlier["rank"], "alpha": earlier.get("alpha", report["alpha"])}
    out.meta = {**meta, "method_config": config_to_json(config), "truncated_from": report}
    return out
