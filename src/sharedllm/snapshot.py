"""Mid-training snapshots, so that a long training run stopped part-way resumes where it stopped.

A 1.5B LoRA adapter takes over an hour on a 2-core CPU; a run stopped at a session's end or by SIGTERM would
otherwise lose all of it. At the first step after every `every_s` seconds (full fine-tuning: never; see
`for_method`), at once on SIGTERM (between two steps), and at the end of a run that wrote one before, the trainer
writes one safetensors file (temp file, fsync, rename): the trainable tensors, AdamW's state, the torch RNG state,
and JSON metadata (the steps done, each user's losses so far, the wall and CPU seconds spent, where it ran, and a
`key` naming what is being trained). A later run with the same snapshot path and key restores it and goes on: its
batches are the sampler's next ones (each sampler is advanced past the batches already used), so the finished
adapter is the one an uninterrupted run gives, to the bit on the same CPU kind and torch (elsewhere it says so). A
snapshot whose key, shapes or progress do not check out is ignored (training starts again, nothing loaded) and
replaced. The caller deletes the file once the adapter is written. Never unpickles: safetensors and JSON only; every
tensor is checked before any is used.
"""
from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .log import say
from .machine import bf16_matmuls, cpu_model

EVERY_S = 300.0  # a snapshot at most this often (seconds of wall time)


@dataclass
class Resumed:
    """What a snapshot restored: steps done, losses so far (one list per member),
    seconds already spent. Resumed() = nothing: training starts at step 0."""
    step: int = 0
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0


class Snapshot:
    """One training run's snapshot file. `key`: JSON-able description of the run (config, method, users, base);
    a file with another key is not this run's. Use as a context manager around the training loop: inside it,
    SIGTERM (in the main thread, unless it was ignored) asks for a snapshot after the current step and then stops
    the run; the previous handler is put back on leaving."""

    def __init__(self, path, key: dict, every_s: float | None = None):
        self.path, self.key = Path(path), json.loads(json.dumps(key, default=str))
        self.every_s = EVERY_S if every_s is None else every_s
        self._last = time.perf_counter()
        self._stop = self._saved = False
        self._installed, self._old_handler = False, None
        self._params, self._opt = [], None  # what restore() was given: what after_step / finish save

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGTERM)
            if old is not signal.SIG_IGN:
                self._old_handler = signal.signal(signal.SIGTERM, self._on_term)
                self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old_handler is None else self._old_handler)
            self._installed = False
        # let the run's optimizer go with the run: AdamW's state is 8 bytes per trained parameter (5 GB for a
        # 0.5B full fine-tune), and the caller still holds this snapshot while it saves and scores the adapter
        self._params, self._opt = [], None
        return False

    def _on_term(self, signum, frame):
        self._stop = True

    def restore(self, params: list, opt: torch.optim.Optimizer, samplers: list, total_steps: int) -> Resumed:
        """Load the snapshot into `params` and `opt` and advance `samplers`; Resumed() (nothing done, nothing
        changed) when there is none or it is not this run's. Everything is checked before anything is loaded.
        Later snapshots save these same `params` and `opt`."""
        self._params, self._opt = params, opt
        if not self.path.is_file():
            return Resumed()
        try:
            meta = _meta(self.path)
            if meta.get("key") != self.key:
                raise ValueError("it was written for another run")
            done = _checked_progress(meta, len(samplers), total_steps)
            tensors = load_file(str(self.path))
            state = _checked_tensors(tensors, params)
        except Exception as e:  # noqa: BLE001 - any unusable snapshot means: train from the start
            say(f"ignoring training snapshot {self.path} ({e}); training from step 0")
            return Resumed()
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param/{i}"])
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        for sampler in samplers:
            for _ in range(done.step):
                next(sampler)
        where = meta.get("env")
        if where and where != environment():
            say(f"note: the snapshot was written on {where}, this run is on {environment()}: the adapter will "
                "not be bit-identical to an uninterrupted run on either")
        say(f"resuming from training snapshot {self.path} at step {done.step}/{total_steps}")
        return done

    def after_step(self, step: int, losses: list, wall_s: float, cpu_s: float) -> None:
        """Call after each step: writes a snapshot when one is due; on SIGTERM writes one and exits (code 143)."""
        if time.perf_counter() - self._last >= self.every_s or self._stop:
            self.save(step, losses, wall_s, cpu_s)
        if self._stop:
            say(f"stopped by SIGTERM at step {step}; run the same command again to resume from {self.path}")
            raise SystemExit(128 + signal.SIGTERM)

    def finish(self, step: int, losses: list, wall_s: float, cpu_s: float) -> None:
        """Call when the loop ends: a run long enough to have written a snapshot writes its final state, so that a
        stop during what follows (scoring, saving) loses no training."""
        if self._saved:
            self.save(step, losses, wall_s, cpu_s)

    def save(self, step: int, losses: list, wall_s: float, cpu_s: float) -> None:
        """Write the snapshot now: the tensors and optimizer given to restore(), `step` steps done."""
        tensors = {f"param/{i}": p.detach().contiguous() for i, p in enumerate(self._params)}
        for i, state in self._opt.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"opt/{i}/{name}"] = torch.as_tensor(value).contiguous()
        tensors["rng"] = torch.get_rng_state()
        meta = {"key": self.key, "step": step, "losses": losses, "wall_s": wall_s, "cpu_s": cpu_s,
                "env": environment()}
        write_atomic(self.path, lambda tmp: save_file(tensors, tmp, metadata={"snapshot": json.dumps(meta)}))
        self._last, self._saved = time.perf_counter(), True

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class NoSnapshot:
    """A run that keeps no snapshot: restores nothing, writes nothing (what the trainers use without one)."""

    def restore(self, params, opt, samplers, total_steps) -> Resumed:
        return Resumed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def after_step(self, *args) -> None:
        pass

    def finish(self, *args) -> None:
        pass

    def clear(self) -> None:
        pass


NO_SNAPSHOT = NoSnapshot()


def for_method(method: str, path, key: dict) -> Snapshot:
    """The snapshot of a run training `method`. A method without `caps.periodic_snapshot` (full fine-tuning) writes
    one only on SIGTERM, never every EVERY_S: it holds every weight plus AdamW's two moments (12 bytes per
    parameter: 7.56 GB for the 0.5B base, measured)."""
    from .adapters import get_method

    return Snapshot(path, key, every_s=None if get_method(method).caps.periodic_snapshot else math.inf)


def environment() -> str:
    """Where a snapshot's steps ran: the same code on the same CPU kind gives bit-identical steps."""
    return f"torch {torch.__version__}, {cpu_model()}, bf16 matmuls {bf16_matmuls('cpu')}"


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
        raw = (f.metadata() or {}).get("snapshot")
    if raw is None:
        raise ValueError("no snapshot metadata")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not an object")
    return meta


def _checked_progress(meta: dict, members: int, total_steps: int) -> Resumed:
    step, losses = meta.get("step"), meta.get("losses")
    if not isinstance(step, int) or not 0 < step <= total_steps:
        raise ValueError(f"step {step!r} of {total_steps}")
    if not isinstance(losses, list) or len(losses) != members:
        raise ValueError(f"losses of {len(losses) if isinstance(losses, list) else 0} users, not {members}")
    for one in losses:
        if not isinstance(one, list) or len(one) != step or not all(isinstance(x, (int, float)) for x in one):
            raise ValueError(f"a losses list that is not {step} numbers")
    seconds = [meta.get("wall_s"), meta.get("cpu_s")]
    if not all(isinstance(x, (int, float)) and x >= 0 for x in seconds):
        raise ValueError("wall_s / cpu_s are not non-negative numbers")
    return Resumed(step, [[float(x) for x in one] for one in losses], float(seconds[0]), float(seconds[1]))


OPT_STATE = {"step": (), "exp_avg": None, "exp_avg_sq": None}  # AdamW's per-parameter state: None = its shape


def _checked_tensors(tensors: dict, params: list) -> dict:
    """Check every tensor against `params` and AdamW; return the optimizer state {index: {name: tensor}}."""
    rng = torch.get_rng_state()
    if "rng" not in tensors or tensors["rng"].dtype != rng.dtype or tensors["rng"].shape != rng.shape:
        raise ValueError("no usable RNG state")
    state: dict = {}
    for k, v in tensors.items():
        parts = k.split("/")
        if parts[0] == "param" and len(parts) == 2 and parts[1].isdigit() and int(parts[1]) < len(params):
            want = params[int(parts[1])]
            if v.shape != want.shape or v.dtype != want.dtype:
                raise ValueError(f"tensor {k} is {tuple(v.shape)} {v.dtype}, not {tuple(want.shape)} {want.dtype}")
        elif parts[0] == "opt" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(params) \
                and parts[2] in OPT_STATE:
            shape = OPT_STATE[parts[2]]
            shape = params[int(parts[1])].shape if shape is None else torch.Size(shape)
            if v.shape != shape or not v.is_floating_point():
                raise ValueError(f"optimizer tensor {k} is {tuple(v.shape)} {v.dtype}, not {tuple(shape)}")
            state.setdefault(int(parts[1]), {})[parts[2]] = v
        elif k != "rng":
            raise ValueError(f"unexpected tensor {k!r}")
    if sum(k.startswith("param/") for k in tensors) != len(params):
        raise ValueError("it holds another number of tensors")
    if any(set(one) != set(OPT_STATE) for one in state.values()):
        raise ValueError("incomplete optimizer state")
    return state
