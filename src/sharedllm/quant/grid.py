"""What every ternary PTQ method shares: the config (every knob of every method) and the asymmetric grid fit
W ~= alpha * T + mu per row (or group of columns), T in {-1, 0, 1}. Used by ptq.py (the methods) and gptq.py."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import SharedLLMError
from .ternary import TernaryTensor


@dataclass
class PTQConfig:
    """Every knob of every method; the file records the ones its method used."""

    group: int = 0            # columns per scale group; 0 = the whole row
    fit_iters: int = 10       # alternating least-squares iterations of the asym fit
    calib_seqs: int = 32      # calibration sequences of calib_len tokens (gptq-asym)
    calib_len: int = 256
    damp: float = 0.01        # GPTQ damping, as a fraction of mean(diag(H))
    rounds: int = 2           # GPTQ passes, each followed by an output-error refit of alpha / mu
    act_order: bool = True    # quantise columns in order of decreasing activation energy
    target_bpw: float = 1.70  # keep the worst matrices as int8 while bits/weight stays under this (0 = never)
    keep_err: float = 0.25    # ... namely those whose relative output error exceeds this (0 = never)
    repair_steps: int = 0     # distillation steps re-tuning norm gains, alpha and mu (repair.py)
    repair_lr: float = 2e-3
    repair_batch: int = 4
    seed: int = 0

    def used(self, method: str) -> dict:
        keys = {"absmean": [], "asym": ["group", "fit_iters"]}.get(method)
        d = asdict(self)
        return d if keys is None else {k: d[k] for k in keys}


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group]"""
    g = group or w.shape[1]
    if w.shape[1] % g:
        raise SharedLLMError(f"group size {g} does not divide {w.shape[1]} columns")
    return w.reshape(w.shape[0], -1, g)


def asym_fit(w: torch.Tensor, group: int = 0, iters: int = 10) -> TernaryTensor:
    """Least-squares alpha, mu per (row, group) and codes T, by alternating minimisation from a TWN start."""
    x = _groups(w.float(), group)
    mu = x.mean(-1, keepdim=True)
    r = x - mu
    t = torch.where(r.abs() > 0.7 * r.abs().mean(-1, keepdim=True), torch.sign(r), torch.zeros_like(r))
    for _ in range(iters):
        alpha, mu = _ls_alpha_mu(x, t)
        t = torch.clamp(torch.round((x - mu) / alpha), -1, 1)
    alpha, mu = _ls_alpha_mu(x, t)
    return TernaryTensor(t.reshape(w.shape), alpha.squeeze(-1), mu.squeeze(-1))


def _ls_alpha_mu(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over alpha, mu of sum (x - alpha t - mu)^2 per group (2x2 normal equations)."""
    n = x.shape[-1]
    st, stt = t.sum(-1, keepdim=True), (t * t).sum(-1, keepdim=True)
    sx, sxt = x.sum(-1, keepdim=True), (x * t).sum(-1, keepdim=True)
    det = stt * n - st * st
    ok = det.abs() > 1e-9
    alpha = torch.where(ok, (sxt * n - st * sx) / torch.where(ok, det, 1.0), x.abs().mean(-1, keepdim=True))
    mu = torch.where(ok, (sx - alpha * st) / n, x.mean(-1, keepdim=True))
    alpha = torch.where(alpha.abs() < 1e-8, torch.full_like(alpha, 1e-8), alpha)
    return alpha, mu
