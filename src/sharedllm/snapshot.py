"""Mid-training snapshots, so that a long training run stopped part-way resumes where it stopped.

A 1.5B LoRA adapter takes over an hour on a 2-core CPU; a run stopped at a session's end or by SIGTERM would
otherwise lose all of it. Every `every_s` seconds (and at once on SIGTERM, between two steps) the trainer writes
one safetensors file (atomically): the trainable tensors, AdamW's state, the torch RNG state, and JSON metadata (the
steps done, each user's losses so far, the wall and CPU seconds spent, and a `key` naming what is being trained).
A later run with the same snapshot path and key restores it and goes on: its batches are the sampler's next ones
(each sampler is advanced past the batches already used), so the finished adapter is the one an uninterrupted run
gives, to the bit on a CPU. A snapshot whose key, shapes or step count do not match is ignored (training starts
again) and replaced. The file is deleted once training completes. Never unpickles: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .atomic import write_bytes_atomic
from .log import say

EVERY_S = 300.0  # a snapshot at most this often (seconds of wall time)


@dataclass
class Resumed:
    """What a snapshot restored: steps done, losses so far (one list per member), seconds already spent."""
    step: int = 0
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0


class Snapshot:
    """One training run's snapshot file. `key`: JSON-able description of the run (config, method, users, base);
    a file with another key is not this run's. Use as a context manager around the training loop: inside it,
    SIGTERM (in the main thread) asks for a snapshot after the current step and then stops the run."""

    def __init__(self, path, key: dict, every_s: float = EVERY_S):
        self.path, self.key, self.every_s = Path(path), json.loads(json.dumps(key, default=str)), every_s
        self._last = time.perf_counter()
        self._stop = False
        self._old_handler = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        return False

    def _on_term(self, signum, frame):
        self._stop = True

    def restore(self, params: list, opt: torch.optim.Optimizer, samplers: list, total_steps: int) -> Resumed:
        """Load the snapshot into `params` and `opt` and advance `samplers`; Resumed() (nothing done) when there is
        none or it is not this run's."""
        if not self.path.is_file():
            return Resumed()
        try:
            tensors = load_file(str(self.path))
            meta = _meta(self.path)
            if meta.get("key") != self.key:
                raise ValueError("it was written for another run")
            step = int(meta["step"])
            if not 0 < step <= total_steps or len(meta["losses"]) != len(samplers):
                raise ValueError(f"step {step} of {total_steps}")
            _load_params(params, tensors)
            _load_optimizer(opt, tensors)
            torch.set_rng_state(tensors["rng"])
        except Exception as e:  # noqa: BLE001 - any unusable snapshot means: train from the start
            say(f"ignoring training snapshot {self.path} ({e}); training from step 0")
            return Resumed()
        for sampler in samplers:
            for _ in range(step):
                next(sampler)
        say(f"resuming from training snapshot {self.path} at step {step}/{total_steps}")
        return Resumed(step, [list(x) for x in meta["losses"]], float(meta["wall_s"]), float(meta["cpu_s"]))

    def after_step(self, step: int, params: list, opt, losses: list, wall_s: float, cpu_s: float) -> None:
        """Call after each step: writes a snapshot when one is due; on SIGTERM writes one and exits (code 143)."""
        due = time.perf_counter() - self._last >= self.every_s
        if due or self._stop:
            self.save(step, params, opt, losses, wall_s, cpu_s)
        if self._stop:
            say(f"stopped by SIGTERM at step {step}; resume from {self.path}")
            raise SystemExit(128 + signal.SIGTERM)

    def save(self, step: int, params: list, opt, losses: list, wall_s: float, cpu_s: float) -> None:
        tensors = {f"param/{i}": p.detach().contiguous() for i, p in enumerate(params)}
        for i, state in opt.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"opt/{i}/{name}"] = torch.as_tensor(value).contiguous()
        tensors["rng"] = torch.get_rng_state()
        meta = {"key": self.key, "step": step, "losses": losses, "wall_s": wall_s, "cpu_s": cpu_s}
        write_bytes_atomic(self.path, save(tensors, metadata={"snapshot": json.dumps(meta)}))
        self._last = time.perf_counter()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def run_key(base_fingerprint: str, method: str, dtype: str, adapters: list, method_config=None) -> dict:
    """What a snapshot must match to be resumed: the base, the method (and its config) and dtype, and per adapter
    (dicts of user, cfg (a TrainConfig), tokens (a tensor), and anything else JSON-able) its config and a digest
    of its training tokens."""
    def one(a: dict) -> dict:
        rest = {k: v for k, v in a.items() if k not in ("cfg", "tokens")}
        return {**rest, "train": a["cfg"].to_json(), "tokens": token_digest(a["tokens"])}
    extra = {} if method_config is None else {"method_config": method_config}
    return {"base": base_fingerprint, "method": method, "dtype": dtype, "adapters": [one(a) for a in adapters],
            **extra}


def token_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()


def beside(path) -> Path:
    """The snapshot file of an adapter written to `path`: `alice.safetensors` -> `alice.snapshot.safetensors`."""
    return Path(path).with_suffix(".snapshot.safetensors")


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["snapshot"])


def _load_params(params: list, tensors: dict) -> None:
    for i, p in enumerate(params):
        saved = tensors[f"param/{i}"]
        if saved.shape != p.shape or saved.dtype != p.dtype:
            raise ValueError(f"tensor {i} is {tuple(saved.shape)} {saved.dtype}, not {tuple(p.shape)} {p.dtype}")
    if len([k for k in tensors if k.startswith("param/")]) != len(params):
        raise ValueError("it holds another number of tensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param/{i}"])


def _load_optimizer(opt, tensors: dict) -> None:
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, name = k.split("/", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
