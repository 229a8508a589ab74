"""One trainer for every adapter method: AdamW at a fixed budget of steps (and optionally seconds)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .data import batch_sampler
from .log import milestone, progress
from .losses import next_token_loss
from .machine import bf16_matmuls
from .snapshot import NO_SNAPSHOT


DTYPES = ("fp32", "bf16")  # compute dtypes of training and scoring (--dtype)
aten = torch.ops.aten


def autocast(dtype: str = "fp32", device="cpu"):
    """The compute dtype (--dtype): fp32 changes nothing; bf16 runs what it wraps under
    torch.autocast(device type, bfloat16): matmuls in bf16, parameters (trainable ones and the optimizer's state)
    stay fp32, and the losses form logits in fp32 and sum NLLs in fp32 (sharedllm.losses). The cast cache is off:
    a region spanning optimizer steps must not reuse a trainable weight's bf16 copy from before the step. Where
    bf16 matmuls are not native (`bf16_matmuls`), the region also runs them as fp32 kernels (`Bf16MatmulsInFp32`)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype != "bf16":
        raise ValueError(f"compute dtype {dtype!r}: fp32 or bf16")
    device_type = torch.device(device).type
    if bf16_matmuls(device) == "native":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    return _emulated_bf16(device_type)


@contextlib.contextmanager
def _emulated_bf16(device_type: str):
    with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False), Bf16MatmulsInFp32():
        yield


class Bf16MatmulsInFp32(TorchDispatchMode):
    """Under bf16 autocast, run every GEMM whose floating operands are all bf16 (mm, addmm, bmm, baddbmm, addbmm,
    mv, addmv, dot) and CPU flash attention on bf16 q/k/v (forward and backward) as fp32 kernels on those exact
    values, rounding what would have been bf16 back to bf16 (attention's logsumexp is fp32 either way). Everything
    else, mixed-dtype calls included, runs untouched (and fails where torch's would)."""

    GEMMS = frozenset((aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                       aten.addbmm.default, aten.mv.default, aten.addmv.default, aten.dot.default))
    ATTENTION = aten._scaled_dot_product_flash_attention_for_cpu.default
    ATTENTIONS = frozenset((ATTENTION, aten._scaled_dot_product_flash_attention_for_cpu_backward.default))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.GEMMS:
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if floats and all(map(_is_bf16, floats)):
                return func(*map(_up, args), **kwargs).to(torch.bfloat16)
        elif func in self.ATTENTIONS and _is_bf16(args[0]):
            out = func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            if func is self.ATTENTION:
                return out[0].to(torch.bfloat16), out[1]
            return tuple(t.to(torch.bfloat16) for t in out)
        return func(*args, **kwargs)


def _up(x):
    return x.float() if _is_bf16(x) else x


def _is_bf16(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16


def hold_frozen_in_bf16(model: torch.nn.Module) -> int:
    """Store `model`'s matmul weights (every nn.Linear's weight except the head and any weight tied to an
    embedding) in bf16, in place; returns the bytes freed. For frozen bases run under `autocast("bf16")` only:
    autocast casts each fp32 weight to bf16 at every matmul (and, with its cast cache off, keeps one more bf16 copy
    per matmul for the backward pass), so holding them in bf16 computes the same numbers with half the weight
    memory and no casts. Embeddings, head, norms and biases stay fp32. A method that would train one of these
    weights (full fine-tuning) is refused by `adapters.adapted_model`; LoRA's random A init is rounded to bf16
    (PEFT gives a new adapter its base layer's dtype before upcasting it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "get_output_embeddings", lambda: None)()
    freed = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, torch.nn.Linear) and m is not head and id(w) not in embeddings
                and w.dtype == torch.float32):
            freed += w.numel() * 2
            w.data = w.data.to(torch.bfloat16)
    return freed


def dtype_meta(dtype: str) -> dict:
    """What an adapter file's metadata adds for a compute dtype other than fp32 (as the bets record it): fp32 files
    stay exactly as they were; a reader takes a missing `compute_dtype` for fp32."""
    return {} if dtype == "fp32" else {"compute_dtype": dtype}


@dataclass
class TrainConfig:
    steps: int = 100
    batch: int = 2
    seq: int = 256
    lr: float = 5e-5
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    seed: int = 0
    budget_s: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


@dataclass
class TrainResult:
    steps: int
    wall_s: float
    losses: list = field(default_factory=list)
    cpu_s: float = 0.0  # process CPU time of the loop: on a shared machine, the work done (wall_s: the wait too)
    resumed_at: int | None = None  # the step a training snapshot resumed it from (sharedllm.snapshot), if any

    def summary(self) -> dict:
        head, tail = self.losses[:5], self.losses[-5:]
        return {"steps": self.steps, "wall_s": round(self.wall_s, 3),
                "loss_first": sum(head) / max(len(head), 1), "loss_last": sum(tail) / max(len(tail), 1)}


def train(model, params: dict, tokens: torch.Tensor, cfg: TrainConfig, label: str = "train",
          snapshot=NO_SNAPSHOT) -> TrainResult:
    """Train `params` (the adapter) of `model` on random windows of `tokens`; everything else stays frozen.
    `snapshot` (a sharedllm.snapshot.Snapshot): resume from it if it holds this run, and keep it up to date (the
    caller deletes it once the trained adapter is saved)."""
    torch.manual_seed(cfg.seed)
    tensors = list(params.values())
    opt = torch.optim.AdamW(tensors, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    batches = batch_sampler(tokens, cfg.batch, cfg.seq, cfg.seed)
    device = tensors[0].device
    done = snapshot.restore(tensors, opt, [batches], cfg.steps)
    losses = done.losses[0] if done.losses else []
    model.train()
    start, cpu = time.perf_counter() - done.wall_s, time.process_time() - done.cpu_s
    with progress(total=cfg.steps, initial=done.step, desc=label, unit="step") as bar, snapshot:
        for _ in range(done.step, cfg.steps):
            if cfg.budget_s is not None and time.perf_counter() - start >= cfg.budget_s:
                break
            losses.append(_step(model, opt, next(batches).to(device)))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            milestone(label, len(losses), cfg.steps, losses[-1])
            snapshot.after_step(len(losses), [losses], time.perf_counter() - start, time.process_time() - cpu)
        snapshot.finish(len(losses), [losses], time.perf_counter() - start, time.process_time() - cpu)
    release_optimizer(opt)
    model.eval()
    return TrainResult(steps=len(losses), wall_s=time.perf_counter() - start, losses=losses,
                       cpu_s=time.process_time() - cpu, resumed_at=done.step or None)


def release_optimizer(opt: torch.optim.Optimizer) -> None:
    """Free an optimizer's state and the last step's gradients now, when training ends. A torch optimizer sits in a
    reference cycle, so dropping it frees them only at the next full garbage collection; AdamW's state is 8 bytes
    per trained parameter (5 GB for a 0.5B full fine-tune), held while the adapter is saved and scored."""
    opt.zero_grad(set_to_none=True)
    opt.state.clear()


def _step(model, opt, batch: torch.Tensor) -> float:
    loss = next_token_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()
