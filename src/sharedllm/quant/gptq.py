"""GPTQ-style ternary rounding on calibration text, decoder layer by decoder layer.

For each layer, in execution order (q/k/v, then o, then gate/up, then down), collect H = E[x x^T] of the
linear's inputs *from the already-quantised model*, fit the asymmetric grid alpha * {-1, 0, 1} + mu per row,
choose the codes column by column while pushing each column's rounding error onto the columns not yet
quantised (Frantar et al. 2022, GPTQ), then refit alpha and mu to minimise tr((W - Q) H (W - Q)^T) exactly.
Matrices whose relative output error stays worst may be kept as per-row int8 while the decoder linears'
bits/weight stays within cfg.target_bpw.
"""
from __future__ import annotations

import time

import torch

from ..log import progress, report
from .grid import PTQConfig, asym_fit
from .ternary import Int8Tensor, TernaryTensor, decoder_linears

LLAMA_GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model, calib: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, kwargs) entering the first decoder layer, for each calibration batch."""
    layer0 = model.model.layers[0]
    got = []

    def grab(module, args, kwargs):
        got.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items()
                                                                      if k != "hidden_states"}))
        raise _Stop

    h = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, len(calib), batch):
            try:
                model(input_ids=calib[i: i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


@torch.no_grad()
def hessians(layer, names: list[str], inputs) -> dict[str, torch.Tensor]:
    """E[x x^T] of the inputs of each named linear of `layer`, over every calibration token."""
    acc, hooks = {}, []
    for n in names:
        def hook(mod, args, out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h, c = acc.get(n, (0, 0))
            acc[n] = (h + x.T @ x, c + x.shape[0])
        hooks.append(layer.get_submodule(n).register_forward_hook(hook))
    try:
        for x, kw in inputs:
            layer(x, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {n: h / c for n, (h, c) in acc.items()}


def _upper_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean() + 1e-8)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_codes(W: torch.Tensor, H: torch.Tensor, A: torch.Tensor, M: torch.Tensor, cfg: PTQConfig,
               block: int = 128) -> torch.Tensor:
    """Ternary codes for W [out, in] on the fixed per-element grid A * {-1,0,1} + M, with error feedback."""
    W = W.clone()
    n = W.shape[1]
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(n)
    W, A, M, H = W[:, perm], A[:, perm], M[:, perm], H[perm][:, perm]
    U = _upper_inverse(H, cfg.damp)
    T = torch.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            a, m = A[:, i1 + i], M[:, i1 + i]
            t = torch.clamp(torch.round((W1[:, i] - m) / a), -1, 1)
            err = (W1[:, i] - (a * t + m)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i], T[:, i1 + i] = err, t
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return T[:, torch.argsort(perm)]


def refit(W: torch.Tensor, H: torch.Tensor, T: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha, mu [out, n_groups] minimising sum_rows (w - q)^T H (w - q) for fixed codes (exact least squares)."""
    out, n = W.shape
    g = n // n_groups
    mask = torch.zeros(n, n_groups)
    mask[torch.arange(n), torch.arange(n) // g] = 1.0
    B = torch.cat([T.unsqueeze(2) * mask, mask.expand(out, n, n_groups)], dim=2)  # [out, in, 2G]
    HB = torch.einsum("ij,ojk->oik", H, B)
    BHB = torch.einsum("oik,oil->okl", B, HB)
    rhs = torch.einsum("oik,oi->ok", HB, W)
    ridge = 1e-6 * BHB.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    sol = torch.linalg.solve(BHB + ridge[:, None, None] * torch.eye(2 * n_groups), rhs.unsqueeze(2)).squeeze(2)
    return sol[:, :n_groups], sol[:, n_groups:]


def out_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T)."""
    D = W - Q
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp_min(1e-20))


def quantize_matrix(W: torch.Tensor, H: torch.Tensor, cfg: PTQConfig) -> tuple[TernaryTensor, float]:
    q = asym_fit(W, cfg.group, cfg.fit_iters)
    n_groups = q.alpha.shape[1]
    for _ in range(max(cfg.rounds, 1)):
        cols = W.shape[1]
        A = q.alpha.repeat_interleave(cols // n_groups, 1)
        M = q.mu.repeat_interleave(cols // n_groups, 1)
        T = gptq_codes(W, H, A, M, cfg)
        alpha, mu = refit(W, H, T, n_groups)
        cand = TernaryTensor(T, alpha, mu)
        if not torch.isfinite(cand.dequant()).all():
            cand = TernaryTensor(T, *refit(W, H + 1e-3 * H.diagonal().mean() * torch.eye(cols), T, n_groups))
        q = cand
    return q, out_error(W, q.dequant(), H)


def _groups_of(layer) -> list[tuple[str, ...]]:
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    if all(n in names for grp in LLAMA_GROUPS for n in grp):
        return LLAMA_GROUPS + [(n,) for n in names if not any(n in grp for grp in LLAMA_GROUPS)]
    return [tuple(names)]


class _Budget:
    """Extra bits available for int8 matrices under cfg.target_bpw, assuming everything else is ternary."""

    def __init__(self, model, cfg: PTQConfig):
        lin = decoder_linears(model)
        self.n = sum(m.weight.numel() for m in lin.values())
        est = sum(_tern_bits(m.weight.shape, cfg) for m in lin.values())
        self.left = cfg.target_bpw * self.n - est if cfg.target_bpw else 0.0

    def take(self, shape, cfg: PTQConfig) -> bool:
        extra = 8 * shape[0] * shape[1] + 16 * shape[0] - _tern_bits(shape, cfg)
        if extra <= self.left:
            self.left -= extra
            return True
        return False


def _tern_bits(shape, cfg: PTQConfig) -> int:
    groups = shape[1] // (cfg.group or shape[1])
    return 8 * (-(-shape[0] * shape[1] // 5)) + 32 * shape[0] * groups


@torch.no_grad()
def quantize_layers(model, calib: torch.Tensor, cfg: PTQConfig, batch: int = 8) -> dict:
    """Quantise every decoder layer in place, in order; returns {linear name: quantised tensor}."""
    prefix = next(n for n, m in model.named_modules() if m is model.model.layers)
    inputs = layer_inputs(model, calib, batch)
    budget, out = _Budget(model, cfg), {}
    layers = progress(list(enumerate(model.model.layers)), desc="quantise layers", unit="layer")
    for li, layer in layers:
        t0 = time.time()
        errs = {}
        for group in _groups_of(layer):
            for name, H in hessians(layer, list(group), inputs).items():
                lin = layer.get_submodule(name)
                W = lin.weight.float()
                q, errs[name] = quantize_matrix(W, H, cfg)
                if cfg.keep_err and errs[name] > cfg.keep_err and budget.take(W.shape, cfg):  # a badly damaged matrix: keep int8
                    q = Int8Tensor.quantize(W)
                    errs[name] = out_error(W, q.dequant(), H)
                lin.weight.copy_(q.dequant())
                out[f"{prefix}.{li}.{name}"] = q
        inputs = [(layer(x, **kw), kw) for x, kw in inputs]
        worst = max(errs, key=errs.get)
        report(layers, f"layer {li}: {time.time() - t0:.1f} s, mean rel. output error "
                       f"{sum(errs.values()) / len(errs):.3f}, worst {worst} {errs[worst]:.3f}")
    return out
