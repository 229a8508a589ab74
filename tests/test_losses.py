"""The chunked next-token loss equals the plain logits path: value, gradients of every adapter method, scoring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sharedllm.adapters import METHODS, adapted_model, get_method
from sharedllm.losses import (causal_lm_parts, linear_cross_entropy, next_token_loss, next_token_nll,
                              weighted_linear_cross_entropy)


def plain_loss(model, batch):
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@pytest.fixture
def batch(tiny):
    return torch.randint(0, tiny.model.config.vocab_size, (2, 41), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunked_loss_and_gradients_equal_the_plain_path(tiny, batch, method):
    model, params = adapted_model(tiny.model, get_method(method))
    with torch.no_grad():  # move the adapter off its identity so that every gradient path is exercised
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    assert causal_lm_parts(model) is not None
    grads = []
    for loss_fn in (plain_loss, next_token_loss):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in params.items()}))
    (plain, g_plain), (fused, g_fused) = grads
    assert fused == pytest.approx(plain, rel=1e-5)
    for name in g_plain:
        assert torch.allclose(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-6), name


def test_chunk_boundaries_do_not_matter_and_head_gradient_is_exact():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (3, 7), generator=gen)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), t.reshape(-1))
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    for chunk in (1, 4, 5, 21, 64):  # 21 tokens: chunks that do and do not divide it
        loss = linear_cross_entropy(h, w, t, chunk=chunk)
        gh, gw = torch.autograd.grad(2.0 * loss, (h, w))  # an upstream gradient that is not 1
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(gh, 2.0 * ref_gh, atol=1e-6) and torch.allclose(gw, 2.0 * ref_gw, atol=1e-6)


def test_scoring_nll_equals_the_plain_path(tiny, batch):
    logits = tiny.model(input_ids=batch[:, :-1]).logits
    plain = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    assert torch.allclose(next_token_nll(tiny.model, batch), plain, atol=1e-5)


def test_a_scaled_head_falls_back_to_the_model_forward(tiny):
    import copy

    model = copy.deepcopy(tiny.model)
    model.config.final_logit_softcapping = 30.0
    assert causal_lm_parts(model) is None



def test_weighted_loss_and_gradients_equal_autograd_of_the_weighted_sum():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(4, 9, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (4, 9), generator=gen)
    tw = torch.rand(4, 9, generator=gen)
    nll_ref = F.cross_entropy((h @ w.t()).transpose(1, 2), t, reduction="none")
    ref = (nll_ref * tw).sum()
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    loss, nll = weighted_linear_cross_entropy(h, w, t, tw, chunk=7)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and not nll.requires_grad
    assert torch.allclose(nll, nll_ref.detach(), atol=1e-5)
    assert torch.allclose(gh, 3.0 * ref_gh, atol=1e-5) and torch.allclose(gw, 3.0 * ref_gw, atol=1e-5)
