"""bf16 on CPUs without native bf16 GEMMs: the same bf16 operands through fp32 kernels (sharedllm.train)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from sharedllm import machine
from sharedllm.train import Bf16MatmulsInFp32, TrainConfig, autocast, bf16_matmuls


@pytest.mark.parametrize("flags, expected", [
    ({"avx", "avx2", "fma"}, "emulated"),            # AMD EPYC / older Xeon: torch's bf16 GEMM is ~8x slower
    ({"avx2", "avx512f", "avx512_bf16"}, "native"),
    ({"avx2", "amx_tile", "amx_bf16"}, "native"),
    (set(), "native"),                                # no /proc/cpuinfo (macOS, Windows) or not x86: left to torch
])
def test_bf16_matmuls_follow_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.delenv("SHAREDLLM_BF16_MATMULS", raising=False)
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    assert bf16_matmuls("cpu") == expected
    assert bf16_matmuls("cuda") == "native"
    monkeypatch.setenv("SHAREDLLM_BF16_MATMULS", "native" if expected == "emulated" else "emulated")
    assert bf16_matmuls("cpu") != expected


def test_an_emulated_gemm_is_the_bf16_operands_multiplied_in_fp32_and_rounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), Bf16MatmulsInFp32():
        y = torch.nn.functional.linear(x, w)
        (y.float() ** 2).sum().backward()
    xb, wb = x.detach().bfloat16().float(), w.detach().bfloat16().float()
    expected = (xb @ wb.T).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    gy = (2 * expected.float()).bfloat16().float()                      # d(sum y^2)/dy, cast to bf16 by autocast
    assert torch.allclose(w.grad, (gy.reshape(-1, 48).T @ xb.reshape(-1, 64)).bfloat16().float(), rtol=1e-2)
    assert not torch.equal(y.float(), x.detach() @ w.detach().T)       # the operands were rounded


def test_emulated_bf16_trains_the_adapter_native_bf16_trains(monkeypatch):
    """The same norm adapter up to summation order, and both unlike fp32's: `--dtype bf16` results agree across
    CPUs with and without native bf16."""
    from sharedllm.base import load_base
    from sharedllm.personalise import personalise

    base = load_base("tiny")
    tokens = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=4, batch=2, seq=32, lr=1e-2)
    gains = {}
    for mode in ("native", "emulated"):
        monkeypatch.setenv("SHAREDLLM_BF16_MATMULS", mode)
        gains[mode] = personalise(base, tokens, "norm", cfg, dtype="bf16").params
    gains["fp32"] = personalise(base, tokens, "norm", cfg, dtype="fp32").params

    def gap(a, b):
        return max((gains[a][k] - gains[b][k]).abs().max().item() for k in gains[a])
    # here 8e-4 vs 1.9e-2; the margin leaves room for another CPU's summation order (under AdamW a gain whose tiny
    # gradient flips sign moves by up to ~lr)
    assert gap("native", "emulated") < 0.5 * gap("native", "fp32")


def test_autocast_enters_the_emulation_only_where_bf16_is_not_native(monkeypatch):
    monkeypatch.setenv("SHAREDLLM_BF16_MATMULS", "emulated")
    with autocast("bf16", "cpu"):
        assert any(isinstance(m, Bf16MatmulsInFp32) for m in torch.utils._python_dispatch._get_current_dispatch_mode_stack())
    monkeypatch.setenv("SHAREDLLM_BF16_MATMULS", "native")
    with autocast("bf16", "cpu"):
        assert not torch.utils._python_dispatch._get_current_dispatch_mode_stack()


def test_emulated_attention_matches_native_bf16_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    grads = []
    for mode in (contextlib.nullcontext(), Bf16MatmulsInFp32()):
        with mode:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
        grads.append((y.detach().float(), *(t.grad.float() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    assert all(torch.allclose(a, b, atol=2e-2, rtol=2e-2) for a, b in zip(*grads))


def test_adapt_says_when_bf16_is_emulated(monkeypatch, tmp_path, capsys):
    from sharedllm.cli import main

    text = tmp_path / "u.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    monkeypatch.setenv("SHAREDLLM_BF16_MATMULS", "emulated")
    assert main(["adapt", "--base", "tiny", "--text", str(text), "--out", str(tmp_path / "a.safetensors"), "--steps",
                 "2", "--seq", "32", "--window", "32", "--dtype", "bf16"]) == 0
    assert "no native bf16 matmuls" in capsys.readouterr().err


def test_a_mixed_dtype_gemm_is_left_to_torch():
    """Only all-bf16 GEMMs are emulated: an fp32 x bf16 product fails as it does without the mode."""
    a, b = torch.randn(4, 8), torch.randn(8, 3).bfloat16()
    with pytest.raises(RuntimeError):
        torch.mm(a, b)
    with Bf16MatmulsInFp32(), pytest.raises(RuntimeError):
        torch.mm(a, b)
    with Bf16MatmulsInFp32():
        assert torch.mv(b.T, b[:, 0]).dtype == torch.bfloat16  # mv: emulated, result bf16
