"""A short repair pass after ternarisation: distil the full-precision base into the ternary one.

Trains only what the ternary file can store without changing its codes: every RMSNorm gain, and each ternary
matrix's alpha and mu (its codes stay fixed). Loss: KL(teacher || student) on the next-token distribution, on
random windows of the calibration (general) text; never on any user's text.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..arch import norm_modules
from ..data import batch_sampler
from ..log import progress, report
from ..snapshot import NO_SNAPSHOT
from ..train import release_optimizer
from .ternary import TernaryTensor


class TernaryLinear(torch.nn.Module):
    """y = x (alpha * T + mu)^T + b with T fixed and alpha, mu trainable."""

    def __init__(self, q: TernaryTensor, bias):
        super().__init__()
        self.register_buffer("codes", q.codes.float())
        self.alpha = torch.nn.Parameter(q.alpha.clone())
        self.mu = torch.nn.Parameter(q.mu.clone() if q.mu is not None else torch.zeros_like(q.alpha))
        self.bias = bias
        self.cols = q.codes.shape[1]

    def weight_now(self) -> torch.Tensor:
        g = self.cols // self.alpha.shape[1]
        return self.alpha.repeat_interleave(g, 1) * self.codes + self.mu.repeat_interleave(g, 1)

    def forward(self, x):
        return F.linear(x, self.weight_now(), self.bias)

    def frozen(self) -> TernaryTensor:
        return TernaryTensor(self.codes, self.alpha.detach(), self.mu.detach())


def _swap(model, name: str, new):
    parent, _, child = name.rpartition(".")
    old = getattr(model.get_submodule(parent), child)
    setattr(model.get_submodule(parent), child, new)
    return old


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _repair_step(student, teacher, opt, x: torch.Tensor) -> float:
    with torch.no_grad():
        target = teacher(input_ids=x, use_cache=False).logits
    loss = kl_loss(student(input_ids=x, use_cache=False).logits, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def repair(student, teacher, qtensors: dict, calib: torch.Tensor, cfg, snapshot=NO_SNAPSHOT) -> dict:
    """Distil `teacher` into `student` (in place); returns qtensors with the re-tuned alpha / mu. `snapshot` (a
    sharedllm.snapshot.Snapshot): resume from it if it holds this pass, and keep it up to date."""
    wrapped = {n: TernaryLinear(q, student.get_submodule(n).bias) for n, q in qtensors.items()
               if isinstance(q, TernaryTensor)}
    originals = {n: _swap(student, n, w) for n, w in wrapped.items()}
    norms = [m.weight for m in norm_modules(student).values()]
    scales = [p for w in wrapped.values() for p in (w.alpha, w.mu)]
    for p in norms + scales:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": norms, "lr": cfg.repair_lr},
                             {"params": scales, "lr": cfg.repair_lr / 10}], betas=(0.9, 0.95), weight_decay=0.0)
    batches = batch_sampler(calib.reshape(-1), cfg.repair_batch, cfg.calib_len - 1, cfg.seed)
    done = snapshot.restore(norms + scales, opt, [batches], cfg.repair_steps)
    losses = done.losses[0] if done.losses else []
    student.train()
    t0, cpu = time.perf_counter() - done.wall_s, time.process_time() - done.cpu_s
    steps = progress(range(done.step, cfg.repair_steps), desc="repair", unit="step")
    with snapshot:
        for step in steps:
            losses.append(_repair_step(student, teacher, opt, next(batches)[:, :-1]))
            if step % 10 == 0 or step == cfg.repair_steps - 1:
                report(steps, f"repair step {step + 1}/{cfg.repair_steps}: KL {losses[-1]:.4f} "
                              f"({time.perf_counter() - t0:.0f} s)")
            snapshot.after_step(len(losses), [losses], time.perf_counter() - t0, time.process_time() - cpu)
        snapshot.finish(len(losses), [losses], time.perf_counter() - t0, time.process_time() - cpu)
    release_optimizer(opt)
    student.eval()
    out = dict(qtensors)
    with torch.no_grad():
        for n, w in wrapped.items():
            out[n] = w.frozen()
            lin = originals[n]
            lin.weight.copy_(out[n].dequant())
            _swap(student, n, lin)
    for p in student.parameters():
        p.requires_grad_(False)
    return out
