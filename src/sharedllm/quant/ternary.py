"""The ternary base file: decoder linear weights as ternary codes {-1, 0, +1} packed 5 trits per byte.

A weight matrix W [out, in] is stored as codes T (packed), per-row-and-group scales alpha and (asymmetric
methods) offsets mu, both fp16: W ~= alpha * T + mu, alpha and mu broadcast over groups of columns. A few
sensitive matrices may be kept as per-row int8 instead; they are counted in bits_per_weight. Everything else
(embeddings / tied LM head in fp16, RMSNorm gains and biases in fp32, the tokenizer files as uint8) is stored
beside them and accounted separately. The metadata (JSON under `sharedllm`) names the source base's
fingerprint, the method and its parameters, a sha256 of the payload and the file's own fingerprint, which is
the fingerprint of the loaded base (so adapters trained on it are bound to it).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..arch import Base, check_rmsnorm, freeze
from ..atomic import write_bytes_atomic
from ..errors import SharedLLMError
from ..tokenizer import ByteTokenizer, HFTokenizer

FORMAT = "sharedllm-ternary-base"
FORMAT_VERSION = 1
TOKENIZER_PREFIX = "__tokenizer__/"
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
_LUT = torch.stack([(torch.arange(256) // int(p)) % 3 - 1 for p in _POW3], dim=1).to(torch.int8)  # byte -> 5 codes


# ----------------------------------------------------------------------------------------------- trit packing
def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1} (any shape) -> uint8 [ceil(n / 5)], 5 base-3 digits per byte (max 242)."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -1 or flat.max() > 1):
        raise SharedLLMError("ternary codes must be in {-1, 0, +1}")
    pad = (-flat.numel()) % 5
    digits = torch.cat([flat + 1, torch.zeros(pad, dtype=torch.int16)]).reshape(-1, 5)
    return (digits * _POW3).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_trits: uint8 [ceil(n / 5)] -> int8 codes [n] in {-1, 0, +1}."""
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 5):
        raise SharedLLMError(f"packed trits: expected {-(-n // 5)} uint8 bytes for {n} codes, got "
                             f"{packed.numel()} {packed.dtype}")
    if packed.numel() and packed.max() > 242:
        raise SharedLLMError("packed trits: byte value above 242 (3^5 - 1); the payload is corrupt")
    return _LUT[packed.long()].reshape(-1)[:n]


# ------------------------------------------------------------------------------------- quantised tensors
def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to what the file stores, so that quality measured in memory equals quality after loading."""
    return t.detach().to(torch.float16).float()


def _expand(s: torch.Tensor, cols: int) -> torch.Tensor:
    return s.repeat_interleave(cols // s.shape[1], dim=1)


@dataclass
class TernaryTensor:
    """W ~= alpha * T + mu; alpha, mu [rows or 1, groups] broadcast over equal column groups."""

    codes: torch.Tensor  # int8 [out, in] in {-1, 0, +1}
    alpha: torch.Tensor
    mu: torch.Tensor | None = None
    kind = "ternary"  # the file's name for this kind of matrix (metadata "kinds"; read_quantised)

    def __post_init__(self):
        self.codes = self.codes.to(torch.int8)
        self.alpha = _fp16(self.alpha)
        self.mu = None if self.mu is None else _fp16(self.mu)
        if self.codes.shape[1] % self.alpha.shape[1]:
            raise SharedLLMError(f"{self.codes.shape[1]} columns do not split into {self.alpha.shape[1]} groups")

    def dequant(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        w = _expand(self.alpha, cols) * self.codes.float()
        return w if self.mu is None else w + _expand(self.mu, cols)

    def to_file(self, name: str) -> dict:
        out = {f"{name}.codes": pack_trits(self.codes), f"{name}.alpha": self.alpha.half()}
        if self.mu is not None:
            out[f"{name}.mu"] = self.mu.half()
        return out

    def bits(self) -> int:
        return 8 * (-(-self.codes.numel() // 5)) + 16 * (self.alpha.numel() + (0 if self.mu is None else
                                                                                 self.mu.numel()))


@dataclass
class Int8Tensor:
    """A sensitive matrix kept at higher precision: per-row symmetric int8, W ~= scale * q."""

    q: torch.Tensor
    scale: torch.Tensor
    kind = "int8"

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Tensor":
        scale = _fp16(w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127)
        return cls(torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale)

    def dequant(self) -> torch.Tensor:
        return self.q.float() * self.scale

    def to_file(self, name: str) -> dict:
        return {f"{name}.q8": self.q, f"{name}.scale": self.scale.half()}

    def bits(self) -> int:
        return 8 * self.q.numel() + 16 * self.scale.numel()


QUANTISED_PARTS = ("codes", "alpha", "mu", "q8", "scale")  # what `to_file` writes for a quantised matrix


def _quantised_part(name: str, kinds: dict) -> bool:
    module, part = name.rsplit(".", 1)
    return module in kinds and part in QUANTISED_PARTS


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear except the LM head (and anything sharing the input embedding's weight)."""
    emb = model.get_input_embeddings().weight
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and m.weight is not emb and not n.endswith("lm_head")}


def bits_per_weight(qtensors: dict) -> float:
    """Decoder-linear bits per weight, scales and kept higher-precision matrices included."""
    n = sum(q.codes.numel() if isinstance(q, TernaryTensor) else q.q.numel() for q in qtensors.values())
    return sum(q.bits() for q in qtensors.values()) / max(n, 1)


# --------------------------------------------------------------------------------------------- the file
def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _own_fingerprint(payload_sha: str, config: dict, kinds: dict) -> str:
    text = json.dumps({"v": FORMAT_VERSION, "payload": payload_sha, "config": config, "kinds": kinds},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _tokenizer_tensors(tokenizer) -> tuple[str, dict]:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte", {}
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        files = {TOKENIZER_PREFIX + p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                 for p in sorted(Path(d).iterdir()) if p.is_file()}
    return "hf", files


def _config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    return json.loads(json.dumps(cfg, default=str))


def _nbytes(tensors: dict, pick) -> int:
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if pick(n))


def build_file(model, tokenizer, qtensors: dict, info: dict) -> tuple[bytes, dict]:
    """(file bytes, metadata) for a model whose decoder linears `qtensors` replaces; `info` must hold at
    least method, params and source_fingerprint."""
    from .. import wire

    tensors, kinds = {}, {}
    for pname, p in model.named_parameters():  # named_parameters drops the tied LM head
        mod = pname.rsplit(".", 1)[0]
        if mod in qtensors and pname.endswith(".weight"):
            tensors.update(qtensors[mod].to_file(mod))
            kinds[mod] = qtensors[mod].kind
        else:
            tensors[pname] = p.detach().cpu().to(torch.float16 if p.dim() >= 2 else torch.float32).contiguous()
    tok_kind, tok_tensors = _tokenizer_tensors(tokenizer)
    tensors.update(tok_tensors)
    config = _config_dict(model)
    payload = tensors_digest(tensors)
    quant = set(kinds)
    is_q = lambda n: n.rsplit(".", 1)[0] in quant  # noqa: E731
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **info, "bits_per_weight": bits_per_weight(qtensors),
            "decoder_linear_weights": sum(model.get_submodule(m).weight.numel() for m in quant),
            "bytes_decoder_linears": _nbytes(tensors, is_q),
            "bytes_embeddings_fp16": _nbytes(tensors, lambda n: not is_q(n) and tensors[n].dim() >= 2
                                             and not n.startswith(TOKENIZER_PREFIX)),
            "bytes_norms_biases_fp32": _nbytes(tensors, lambda n: tensors[n].dtype == torch.float32),
            "bytes_tokenizer": _nbytes(tensors, lambda n: n.startswith(TOKENIZER_PREFIX)),
            "tokenizer": tok_kind, "kinds": kinds, "config": config, "payload_sha256": payload,
            "fingerprint": _own_fingerprint(payload, config, kinds), "version": __version__}
    return wire.adapter_bytes(tensors, meta), meta


def save_ternary_base(path, model, tokenizer, qtensors: dict, info: dict) -> dict:
    data, meta = build_file(model, tokenizer, qtensors, info)
    write_bytes_atomic(path, data)
    return {**meta, "bytes": len(data)}


# ------------------------------------------------------------------------------------------------ loading
def read_ternary_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a ternary base file, refusing truncation, tampering and wrong formats."""
    from .. import wire

    path = Path(path)
    tensors, meta = wire.read_file(path, expect=FORMAT)
    if meta.get("format_version") != FORMAT_VERSION:
        raise SharedLLMError(f"{path}: ternary base format_version {meta.get('format_version')}, this sharedllm "
                             f"reads {FORMAT_VERSION}")
    payload = tensors_digest(tensors)
    if payload != meta.get("payload_sha256"):
        raise SharedLLMError(f"{path}: payload sha256 {payload[:16]}... does not match the metadata's "
                             f"{str(meta.get('payload_sha256'))[:16]}...; the file is corrupt or was modified")
    if _own_fingerprint(payload, meta.get("config"), meta.get("kinds")) != meta.get("fingerprint"):
        raise SharedLLMError(f"{path}: metadata (config or tensor kinds) does not match its fingerprint; "
                             "the file was modified")
    return tensors, meta


def read_quantised(tensors: dict, mod: str, kind: str, shape, source: str):
    try:
        if kind == "ternary":
            mu = tensors.get(f"{mod}.mu")
            codes = unpack_trits(tensors[f"{mod}.codes"], shape[0] * shape[1]).reshape(shape)
            return TernaryTensor(codes, tensors[f"{mod}.alpha"].float(), None if mu is None else mu.float())
        if kind == "int8":
            return Int8Tensor(tensors[f"{mod}.q8"], tensors[f"{mod}.scale"].float())
    except KeyError as e:
        raise SharedLLMError(f"{source}: tensor {e} missing for {kind} matrix {mod}") from None
    raise SharedLLMError(f"{source}: unknown tensor kind {kind!r} for {mod}")


def _model_from_config(config: dict, source: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        cfg = AutoConfig.for_model(**config)
        with no_init_weights():  # every weight is overwritten from the file; random init only costs time
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.tie_weights()
        return model
    except (ValueError, KeyError, TypeError) as e:
        raise SharedLLMError(f"{source}: cannot build the model from the stored config ({e})") from None


def _load_tokenizer(tensors: dict, kind: str, source: str):
    if kind == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    files = {n[len(TOKENIZER_PREFIX):]: t for n, t in tensors.items() if n.startswith(TOKENIZER_PREFIX)}
    if not files:
        raise SharedLLMError(f"{source}: no tokenizer files stored in the base file")
    with tempfile.TemporaryDirectory() as d:
        for name, t in files.items():
            (Path(d) / Path(name).name).write_bytes(t.numpy().tobytes())
        return HFTokenizer(AutoTokenizer.from_pretrained(d))


def dequantised_model(tensors: dict, meta: dict, source: str):
    """The model the file describes, with every quantised matrix dequantised to fp32."""
    model = _model_from_config(meta["config"], source)
    kinds = meta.get("kinds", {})
    state = {n: t.float() for n, t in tensors.items() if not n.startswith(TOKENIZER_PREFIX)
             and not _quantised_part(n, kinds)}  # a quantised module's bias stays
    for mod, kind in kinds.items():
        shape = tuple(model.get_submodule(mod).weight.shape)
        state[f"{mod}.weight"] = read_quantised(tensors, mod, kind, shape, source).dequant()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if set(missing) - tied or unexpected:
        raise SharedLLMError(f"{source}: tensors do not match the stored config (missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]})")
    return model


def load_quantised(path) -> tuple[object, dict, dict]:
    """(dequantised model, {linear name: quantised tensor}, metadata): to continue working on a file."""
    tensors, meta = read_ternary_file(path)
    model = dequantised_model(tensors, meta, str(path))
    q = {mod: read_quantised(tensors, mod, kind, tuple(model.get_submodule(mod).weight.shape), str(path))
         for mod, kind in meta["kinds"].items()}
    return model, q, meta


def load_ternary_base(path, device: str = "cpu") -> Base:
    """A `Base` whose model is the dequantised ternary model and whose fingerprint is the file's own."""
    source = str(path)
    tensors, meta = read_ternary_file(path)
    model = freeze(dequantised_model(tensors, meta, source).to(device))
    check_rmsnorm(model, source)
    tokenizer = _load_tokenizer(tensors, meta.get("tokenizer"), source)
    info = {k: v for k, v in meta.items() if k != "config"}
    return Base(model=model, tokenizer=tokenizer, fingerprint=meta["fingerprint"], name=Path(path).name, meta=info)
