"""Ternary post-training quantisation methods, one registry keyed by the name written into the file.

absmean    BitNet b1.58's rule, per tensor: s = mean|W|, T = round(clip(W / s, -1, 1)); the naive baseline.
asym       asymmetric ternary W ~= alpha * T + mu per row (or per group of columns), fitted by alternating
           least squares on the weights alone (no data).
gptq-asym  the same grid, but codes chosen by GPTQ-style error feedback on calibration text, layer by layer on the
           already-quantised model, alpha / mu refitted to minimise the layer's output error; optionally the
           most damaged matrices kept as per-row int8 within a bits/weight budget (see gptq.py).
Each method maps (model, calibration tokens, params) -> {linear name: TernaryTensor | Int8Tensor}.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch

from ..errors import SharedLLMError
from .ternary import TernaryTensor, decoder_linears


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
    log: object = field(default=None, repr=False, compare=False)  # progress callback (not recorded)

    def used(self, method: str) -> dict:
        keys = {"absmean": [], "asym": ["group", "fit_iters"]}.get(method)
        d = {k: v for k, v in asdict(self).items() if k != "log"}
        return d if keys is None else {k: d[k] for k in keys}


def absmean(w: torch.Tensor, cfg: PTQConfig) -> TernaryTensor:
    s = w.abs().mean().clamp_min(1e-8)
    return TernaryTensor(torch.round(torch.clamp(w / s, -1, 1)), s.reshape(1, 1))


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


def per_matrix(fn):
    """A data-free method: quantise every decoder linear independently."""
    def method(model, calib, cfg: PTQConfig) -> dict:
        return {n: fn(m.weight.detach().float(), cfg) for n, m in decoder_linears(model).items()}
    return method


def _gptq_asym(model, calib, cfg: PTQConfig) -> dict:
    from .gptq import quantize_layers

    if calib is None:
        raise SharedLLMError("method gptq-asym needs calibration text (--calib)")
    need = cfg.calib_seqs * cfg.calib_len
    if calib.numel() < need:
        raise SharedLLMError(f"calibration text has {calib.numel()} tokens; gptq-asym needs {need} "
                             "(calib_seqs x calib_len)")
    return quantize_layers(model, calib.reshape(-1)[:need].reshape(cfg.calib_seqs, cfg.calib_len), cfg)


METHODS = {
    "absmean": per_matrix(absmean),
    "asym": per_matrix(lambda w, cfg: asym_fit(w, cfg.group, cfg.fit_iters)),
    "gptq-asym": _gptq_asym,
}
NEEDS_CALIB = {"gptq-asym"}


def quantize_model(model, method: str, calib: torch.Tensor | None, cfg: PTQConfig) -> tuple[object, dict]:
    """`calib`: a 1-D token stream of general text (or None for data-free methods). Returns
    (a quantised copy of `model` holding the dequantised weights and any repaired norms,
    {linear name: quantised tensor}); `model` itself is left untouched (it is the repair's teacher)."""
    if method not in METHODS:
        raise SharedLLMError(f"unknown ternary method {method!r}; choose from {', '.join(METHODS)}")
    if cfg.repair_steps and calib is None:
        raise SharedLLMError("the repair pass needs calibration text (--calib)")
    student = copy.deepcopy(model)
    q = METHODS[method](student, calib, cfg)
    with torch.no_grad():
        for name, m in decoder_linears(student).items():
            m.weight.copy_(q[name].dequant())
    if cfg.repair_steps:
        from .repair import repair

        q = repair(student, model, q, calib, cfg)
    return student, q
