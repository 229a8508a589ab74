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

import torch

from ..errors import SharedLLMError
from ..snapshot import NO_SNAPSHOT
from .gptq import quantize_layers
from .grid import PTQConfig, asym_fit
from .stages import QuantiseStages
from .ternary import TernaryTensor, decoder_linears

__all__ = ["METHODS", "NEEDS_CALIB", "PTQConfig", "absmean", "asym_fit", "per_matrix", "quantize_model"]


def absmean(w: torch.Tensor, cfg: PTQConfig) -> TernaryTensor:
    s = w.abs().mean().clamp_min(1e-8)
    return TernaryTensor(torch.round(torch.clamp(w / s, -1, 1)), s.reshape(1, 1))


def per_matrix(fn):
    """A data-free method: quantise every decoder linear independently."""
    def method(model, calib, cfg: PTQConfig) -> dict:
        return {n: fn(m.weight.detach().float(), cfg) for n, m in decoder_linears(model).items()}
    return method


def _gptq_asym(model, calib, cfg: PTQConfig) -> dict:
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


def quantize_model(model, method: str, calib: torch.Tensor | None, cfg: PTQConfig,
                   stages: QuantiseStages | None = None) -> tuple[object, dict]:
    """`calib`: a 1-D token stream of general text (or None for data-free methods). Returns
    (a quantised copy of `model` holding the dequantised weights and any repaired norms,
    {linear name: quantised tensor}); `model` itself is left untouched (it is the repair's teacher).
    `stages`: keep the codes and the repair's snapshot there, and resume from what a stopped run kept."""
    if method not in METHODS:
        raise SharedLLMError(f"unknown ternary method {method!r}; choose from {', '.join(METHODS)}")
    if cfg.repair_steps and calib is None:
        raise SharedLLMError("the repair pass needs calibration text (--calib)")
    student = copy.deepcopy(model)
    q = stages.kept_codes(student) if stages else None
    if q is None:
        q = METHODS[method](student, calib, cfg)
        if stages and cfg.repair_steps:
            stages.keep_codes(q)
    with torch.no_grad():
        for name, m in decoder_linears(student).items():
            m.weight.copy_(q[name].dequant())
    if cfg.repair_steps:
        from .repair import repair

        q = repair(student, model, q, calib, cfg, stages.repair_snapshot() if stages else NO_SNAPSHOT)
    return student, q
