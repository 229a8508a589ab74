"""A lean decode step for Llama and Qwen2 bases: the same math as the HF forward, fewer ops per token.

The HF path (`compute.decode_step`) runs one `LlamaForCausalLM` forward per token: ~80 dispatched ops per layer,
a fresh 4-D attention mask, and a `DynamicCache` that `torch.cat`s every layer's keys and values each step (the
whole cache copied per token). `LeanDecoder.step` does one token for every row of the running batch with

  * weight references fetched once (no module calls), q/k/v and gate/up as one matmul each when fused;
  * a preallocated KV buffer (`LeanCache`: [layers, rows, kv heads, capacity, head dim]) written by index, grown
    in chunks, so a step copies one column per layer instead of the whole cache;
  * one additive padding mask and one rotary (cos, sin) per step, shared by all layers (none for a lone row);
  * grouped-query attention as two batched matmuls on the cache views (no repeat of the KV heads).

Every row still carries its own adapter (a `RowBatch`: its RMSNorm gains, [B, D] per norm, and any per-row
change after a linear, e.g. its LoRA; nothing averaged) and its own positions, so a row's logits are those it gets
alone (tests: within 1e-4 of the HF path, greedy tokens equal). Prefill stays on
the HF path; its DynamicCache is copied into the buffer when rows join. `dtype=torch.bfloat16` keeps a bf16 copy
of the matmul weights (activations cast at each matmul; norms, residuals, attention and the cache stay fp32):
faster on CPUs with AMX for batches, not exact (see docs/BENCHMARKS.md). `dtype=torch.int8` keeps symmetric
per-output-channel int8 weights with bf16 scales (every decoder linear and the head, quantised once at build) and
multiplies them by bf16 activations in `aten._weight_int8pack_mm`: a quarter of the fp32 weight bytes, not exact
(same docs). `dtype=torch.int4` keeps group-wise asymmetric 4-bit weights (groups of INT4_GROUP = 32 inputs, as
llama.cpp's Q4_1) with bf16 scales and zeros in `aten._weight_int4pack_mm_for_cpu`'s packed layout (matrices the
kernel cannot take, outputs not a multiple of 16 or inputs of 32, stay int8): ~1/6 of the fp32 bytes, the fastest
single stream, the least exact (mostly the head's error). `head_dtype` (default: `dtype`) gives the head its own
weights: int4 layers with an int8 head (llama.cpp Q4_1's own mix) moved the default base's logits no more than
int8 at ~1.5x int8's step speed; int8 layers with an int4 head gained only ~1.1-1.3x and lost nearly as much as
int4 (docs/BENCHMARKS.md, session 9). Unsupported architectures (Gemma's (1 + w) gains, sliding-window attention,
qk-norm, non-SiLU MLPs) get None from `LeanDecoder.build`: the server then keeps the HF path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class LeanCache:
    """The running batch's keys and values in one preallocated buffer per kind; same interface as kv.BatchCache.

    Row b's real positions are columns [pads[b], width) of every layer; columns before are left padding."""

    def __init__(self, chunk: int = 64):
        self.k = self.v = None  # [L, B, KV, capacity, hd]
        self.width, self.pads, self.chunk = 0, [], chunk

    def __len__(self) -> int:
        return len(self.pads)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held, capacity included (0 once every row has left)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    @property
    def lengths(self) -> list[int]:
        return [self.width - p for p in self.pads]

    def _alloc(self, like: torch.Tensor, rows: int, cap: int) -> torch.Tensor:
        return like.new_zeros(like.shape[0], rows, like.shape[2], cap, like.shape[4])

    def join(self, cache, pads: list[int]) -> None:
        """Append rows prefilled together in `cache` (an HF DynamicCache, left pads `pads`) to the running batch."""
        k = torch.stack([layer.keys for layer in cache.layers])  # [L, b, KV, w_new, hd]
        v = torch.stack([layer.values for layer in cache.layers])
        w_new, b_new = k.shape[3], k.shape[1]
        w = max(self.width, w_new) if self.pads else w_new
        b_old = len(self.pads)
        nk, nv = self._alloc(k, b_old + b_new, w + self.chunk), self._alloc(v, b_old + b_new, w + self.chunk)
        if b_old:
            nk[:, :b_old, :, w - self.width: w] = self.k[:, :, :, : self.width]
            nv[:, :b_old, :, w - self.width: w] = self.v[:, :, :, : self.width]
        nk[:, b_old:, :, w - w_new: w], nv[:, b_old:, :, w - w_new: w] = k, v
        self.pads = [p + w - self.width for p in self.pads] + [p + w - w_new for p in pads]
        self.k, self.v, self.width = nk, nv, w

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices into the current batch, in order) and cut all-padding columns."""
        if len(rows) == len(self.pads):
            return
        if not rows:
            self.k = self.v = None
            self.width, self.pads = 0, []
            return
        pads = [self.pads[i] for i in rows]
        cut = min(pads)
        idx = torch.tensor(rows, device=self.k.device)
        self.k, self.v = self.k[:, idx, :, cut:], self.v[:, idx, :, cut:]  # index select copies the kept rows
        self.width, self.pads = self.width - cut, [p - cut for p in pads]

    def reserve(self) -> None:
        """Make room for one more column (grow the buffers by `chunk` columns when full)."""
        if self.width < self.k.shape[3]:
            return
        grow = lambda t: torch.cat([t, self._alloc(t, t.shape[1], self.chunk)], dim=3)  # noqa: E731
        self.k, self.v = grow(self.k), grow(self.v)


class _Lin(NamedTuple):
    """One matmul's weights as the step holds them; `_matmul` applies it."""
    weight: torch.Tensor  # [N, K]: fp32 (references), bf16, int8 (symmetric, per output channel); int4: packed uint8
    bias: torch.Tensor | None  # [N] fp32
    scale: torch.Tensor | None = None  # int8: [N] bf16, weight ~= int8 * scale; int4: [K / group, N, 2] scales, zeros
    group: int = 0  # int4 only: inputs per (scale, zero)


@dataclass
class _Layer:
    qkv: list  # [_Lin] applied to the normed input: one fused or three separate matmuls
    o: _Lin
    mlp_in: list  # [_Lin]: fused gate+up, or gate and up
    down: _Lin
    norm_in: int  # indices of this layer's two norms in RowModel.norm_names
    norm_post: int
    sites: dict  # per group ("qkv", "o", "mlp_in", "down"): [(linear site name, output width)] (per-row hooks)


def quantise_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scale [N] bf16) with w ~= q * scale, |q| <= 127."""
    scale = (w.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = (w.detach().float() / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantise_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit, torchao/gpt-fast layout: (packed for `_weight_int4pack_mm_for_cpu`,
    scales_and_zeros [K / group, N, 2] bf16, the dequantised [N, K] fp32) with w ~= (q - 8) * scale + zero, 0 <= q <= 15."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = lo + 8 * scale
    q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    sz = torch.stack([scale, zero], -1).to(torch.bfloat16)  # [N, K / group, 2]
    back = ((q - 8) * sz[..., 0:1].float() + sz[..., 1:2].float()).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)
    return packed, sz.transpose(0, 1).contiguous(), back


# Inputs per int4 (scale, zero): llama.cpp's Q4_1 (and Q4_K's sub-block) size. The named bases are dequantised from
# such GGUF blocks, so aligned groups of 32 land back on their grid (default base's layers: relative error 0.002,
# int8 per channel 0.01, groups of 64 0.08-0.09; docs/BENCHMARKS.md, session 9). Not a claim about fp16 weights.
INT4_GROUP = 32


def _int4_group(n: int, k: int) -> int:
    """Inputs per int4 group for an [n, k] weight; 0: the kernel cannot take it (it needs n % 16 == 0)."""
    return INT4_GROUP if n % 16 == 0 and k % INT4_GROUP == 0 else 0


def _lin(w: torch.Tensor, b: torch.Tensor | None, dtype) -> _Lin:
    """Weights in the step's dtype (a reference when it matches), bias always fp32."""
    b = None if b is None else b.detach().float()
    group = _int4_group(*w.shape) if dtype == torch.int4 else 0
    if group:
        packed, sz, _ = quantise_int4(w, group)
        return _Lin(packed, b, sz, group)
    if dtype in (torch.int8, torch.int4):
        q, scale = quantise_int8(w)
        return _Lin(q, b, scale)
    return _Lin(w.detach().to(dtype), b)


def _group(linears: list, dtype, fuse: bool) -> list[_Lin]:
    """Linears applied to the same input: one matmul over their concatenated rows when `fuse`, else one each."""
    if not fuse or len({lin.bias is None for lin in linears}) != 1:
        return [_lin(lin.weight, lin.bias, dtype) for lin in linears]
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return [_lin(torch.cat([lin.weight for lin in linears]), bias, dtype)]


def _layer(layer: torch.nn.Module, prefix: str, index: dict, dtype, fuse: bool) -> _Layer:
    a, m = layer.self_attn, layer.mlp
    names = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
             "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    sites = {g: [(prefix + n, layer.get_submodule(n).weight.shape[0]) for n in ns] for g, ns in names.items()}
    return _Layer(_group([a.q_proj, a.k_proj, a.v_proj], dtype, fuse), _lin(a.o_proj.weight, a.o_proj.bias, dtype),
                  _group([m.gate_proj, m.up_proj], dtype, fuse), _lin(m.down_proj.weight, m.down_proj.bias, dtype),
                  index[prefix + "input_layernorm.weight"], index[prefix + "post_attention_layernorm.weight"], sites)


def _matmul(x: torch.Tensor, lin: _Lin) -> torch.Tensor:
    """x [B, K] fp32 -> x @ weight.T + bias [B, N] fp32."""
    w = lin.weight
    if w.dtype == torch.float32:
        return F.linear(x, w, lin.bias)
    if lin.group:  # int4: bf16 activations, like int8
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w, lin.group, lin.scale).float()
    elif w.dtype == torch.int8:  # bf16 activations: this kernel's fast path (fp32 ones were 4-14x slower, measured)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w, lin.scale).float()
    elif x.shape[0] > 1:  # bf16 GEMM (AMX where the CPU has it)
        y = F.linear(x.to(w.dtype), w).float()
    else:  # one row: torch.mv's bf16 GEMV reads the weights ~1.7x faster than F.linear's (measured)
        y = torch.mv(w, x[0].to(w.dtype)).float()[None]
    return y if lin.bias is None else y + lin.bias


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype) or str(dtype).removeprefix("torch.")


def unsupported(model: torch.nn.Module) -> str | None:
    """Why the lean step cannot run `model` (None: it can)."""
    cfg = model.config
    if type(model).__name__ not in SUPPORTED:
        return f"architecture {type(model).__name__}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention"
    if any(getattr(layer.self_attn, "q_norm", None) is not None for layer in model.model.layers):
        return "qk-norm"
    return None


class LeanDecoder:
    """`step(cache, tokens, row_batch) -> logits [B, V]` for a RowModel of a supported architecture."""

    def __init__(self, rgm, dtype: torch.dtype = torch.float32, fuse: bool | None = None,
                 head_dtype: torch.dtype | None = None):
        model, cfg = rgm.model, rgm.model.config
        fuse = dtype != torch.float32 if fuse is None else fuse  # fp32 fused = a second copy of those weights
        index = {n: i for i, n in enumerate(rgm.norm_names)}
        self.dtype, self.head_dtype = dtype, dtype if head_dtype is None else head_dtype
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.eps = model.model.layers[0].input_layernorm.eps
        self.layers = [_layer(layer, f"model.layers.{i}.", index, dtype, fuse)
                       for i, layer in enumerate(model.model.layers)]
        self.norm_final = index["model.norm.weight"]
        self.embed = model.model.embed_tokens.weight
        self.head = _lin(model.lm_head.weight, model.lm_head.bias, self.head_dtype)
        self.rotary = model.model.rotary_emb

    @classmethod
    def build(cls, rgm, dtype: torch.dtype = torch.float32) -> "LeanDecoder | None":
        """A LeanDecoder for `rgm`, or None when its architecture needs the HF path."""
        if rgm is None or unsupported(rgm.model) is not None:
            return None
        return cls(rgm, dtype)

    @property
    def name(self) -> str:
        """lean-fp32, lean-bf16, lean-int8, lean-int4; a head of another dtype adds it: lean-int8-head4."""
        head = "" if self.head_dtype == self.dtype else "-head" + _short(self.head_dtype).removeprefix("int")
        return f"lean-{_short(self.dtype)}{head}"

    def new_cache(self) -> LeanCache:
        return LeanCache()

    def _mms(self, x: torch.Tensor, parts: list[_Lin], sites: list, rows) -> torch.Tensor:
        """The group's matmuls on x (fused or one each), then every row's own change after each linear site."""
        y = _matmul(x, parts[0]) if len(parts) == 1 else torch.cat([_matmul(x, p) for p in parts], dim=-1)
        if not any(rows.touches(s) for s, _ in sites):
            return y
        if len(sites) == 1:
            return rows.linear(sites[0][0], x, y)
        outs = y.split([w for _, w in sites], dim=-1)
        return torch.cat([rows.linear(s, x, o) for (s, _), o in zip(sites, outs)], dim=-1)

    def _norm(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # a lone row's gain is rms_norm's own weight: one op fewer
            return F.rms_norm(x, x.shape[-1:], gain[0], eps=self.eps)
        return gain * F.rms_norm(x, x.shape[-1:], eps=self.eps)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """HF's qk * cos + rotate_half(qk) * sin, with rotate_half(qk) * sin = roll(qk, half) * signed_sin."""
        return torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, -1), signed_sin)

    def _step_inputs(self, kv: LeanCache, x: torch.Tensor):
        """(cos, signed sin [B, 1, hd] (first half negated, for `_rope`); additive mask [B, 1, 1, W+1] or None when
        no row has left padding)."""
        pos = torch.tensor(kv.lengths, device=x.device)[:, None]
        cos, sin = self.rotary(x, pos)
        half = sin.shape[-1] // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        if not any(kv.pads):
            return cos, sin, None
        cols = torch.arange(kv.width + 1, device=x.device)
        pads = torch.tensor(kv.pads, device=x.device)[:, None]
        mask = torch.zeros(len(kv), kv.width + 1, device=x.device).masked_fill_(cols < pads, float("-inf"))
        return cos, sin, mask[:, None, None, :]

    def _attend(self, kv: LeanCache, li: int, qkv: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        B, H, KV, hd, w = qkv.shape[0], self.heads, self.kv_heads, self.head_dim, kv.width
        qkv = qkv.view(B, H + 2 * KV, hd)
        qk = self._rope(qkv[:, : H + KV], cos, sin)
        kv.k[li, :, :, w], kv.v[li, :, :, w] = qk[:, H:], qkv[:, H + KV:]
        keys, values = kv.k[li, :, :, : w + 1], kv.v[li, :, :, : w + 1]  # [B, KV, W+1, hd] views
        q = qk[:, :H].reshape(B, KV, H // KV, hd)
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.scale)  # [B, KV, group, W+1]
        if mask is not None:
            scores.add_(mask)
        return torch.matmul(scores.softmax(-1), values).reshape(B, H * hd)

    @torch.inference_mode()
    def step(self, kv: LeanCache, tokens: list[int], rows) -> torch.Tensor:
        """One token for every row of `kv`; `rows` (a RowBatch) holds each row's adapter. Logits [B, V]."""
        kv.reserve()
        x = F.embedding(torch.tensor(tokens, device=self.embed.device), self.embed)  # [B, D]
        cos, sin, mask = self._step_inputs(kv, x)
        for li, layer in enumerate(self.layers):
            h = self._norm(x, rows.gain(layer.norm_in))
            attn = self._attend(kv, li, self._mms(h, layer.qkv, layer.sites["qkv"], rows), cos, sin, mask)
            x = x + self._mms(attn, [layer.o], layer.sites["o"], rows)
            h = self._norm(x, rows.gain(layer.norm_post))
            gate, up = self._mms(h, layer.mlp_in, layer.sites["mlp_in"], rows).chunk(2, dim=-1)
            x = x + self._mms(F.silu(gate) * up, [layer.down], layer.sites["down"], rows)
        kv.width += 1
        return _matmul(self._norm(x, rows.gain(self.norm_final)), self.head)
