"""Next-token cross-entropy from the last hidden state, a chunk of tokens at a time.

The plain path materialises [tokens, vocab] logits for the whole batch (2 x 256 x 49,152 fp32 = 100 MB on the
default base) and pays log_softmax forward, its backward and a zero-fill of the same size: ~15 % of a norm-only
step on a CPU. Here each chunk's logits are formed, reduced to log-sum-exp, and, when training, turned at once into
the gradient (softmax - one-hot) that flows back to the hidden states (and to the head, for full fine-tuning), so
the backward pass is a multiply. Exact up to float rounding; used only when logits are exactly hidden @ W^T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 128  # tokens per chunk: 128 x 49,152 fp32 logits = 25 MB


def causal_lm_parts(model) -> tuple | None:
    """(decoder, head weight) when the model's logits are exactly decoder(x) @ W^T, else None (head bias,
    logit scaling or soft-capping: use the model's own forward)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return None
    head, cfg = inner.get_output_embeddings(), inner.config
    scaled = any(getattr(cfg, k, None) not in (None, 1.0) for k in
                 ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
    if type(head) is not torch.nn.Linear or head.bias is not None or scaled:
        return None
    return inner.get_decoder(), head.weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Returns (loss, per-token NLL). loss = mean NLL, or sum of token_weights * NLL when weights are given."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, token_weights):
        h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        w = None if token_weights is None else token_weights.reshape(-1).float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        nll = torch.empty(len(t), dtype=torch.float32, device=h.device)
        for i in range(0, len(t), chunk):
            hc, tc = h[i:i + chunk], t[i:i + chunk]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll[i:i + chunk] = lse - logits.gather(1, tc[:, None]).squeeze(1)
            if need_h or need_w:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(len(tc), device=p.device), tc] -= 1.0
                if w is not None:
                    p.mul_(w[i:i + chunk, None])
                p = p.to(weight.dtype)
                if need_h:
                    grad_h[i:i + chunk] = p @ weight
                if need_w:
                    grad_w.addmm_(p.t().float(), hc.float())
        ctx.scale = 1.0 / len(t) if w is None else 1.0
        ctx.shape, ctx.w_dtype = hidden.shape, weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        loss = nll.sum() / len(t) if w is None else (nll * w).sum()
        nll = nll.reshape(targets.shape)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_out, _grad_nll):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out * ctx.scale
        dh = (grad_h * scale).reshape(ctx.shape) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.w_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Mean NLL of `targets` under logits hidden @ weight^T, without the [tokens, vocab] tensor."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, None)[0]


def weighted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  token_weights: torch.Tensor, chunk: int = CHUNK) -> tuple:
    """(sum of token_weights * NLL, per-token NLL [detached]); the fleet trainer's loss (sharedllm.fleet)."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, token_weights)


@torch.no_grad()
def token_nll_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = CHUNK) -> torch.Tensor:
    """Per-token NLL [batch, seq] of `targets` under logits hidden @ weight^T, a chunk at a time."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.empty(len(t), dtype=torch.float32, device=h.device)
    for i in range(0, len(t), chunk):
        logits = (h[i:i + chunk] @ weight.t()).float()
        out[i:i + chunk] = torch.logsumexp(logits, -1) - logits.gather(1, t[i:i + chunk, None]).squeeze(1)
    return out.reshape(targets.shape)


def logits_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The same loss the usual way: full [tokens, vocab] logits from the model's forward, then cross-entropy."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` [B, L+1] (the training loss of every adapter method)."""
    parts = causal_lm_parts(model)
    if parts is None:
        return logits_loss(model, batch)
    decoder, weight = parts
    hidden = decoder(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden, weight, batch[:, 1:])


@torch.no_grad()
def next_token_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, L] of `batch` [B, L+1] (forward only: scoring)."""
    parts = causal_lm_parts(model)
    if parts is None:
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    decoder, weight = parts
    hidden = decoder(input_ids=batch[:, :-1], use_cache=False).last_hidden_state
    return token_nll_from_hidden(hidden, weight, batch[:, 1:])
