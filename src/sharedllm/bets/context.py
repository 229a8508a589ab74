"""What a running bet sees: the base, users' data and eval texts, trained adapters (cached under out/), and
scoring with a score cache keyed by the exact adapter file, user, eval text and window."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path

import torch

from sharedllm import wire
from sharedllm.atomic import write_text_atomic
from sharedllm.base import load_base, peek
from sharedllm.log import say
from sharedllm.data import eval_windows, load_user
from sharedllm.metrics import score_windows
from sharedllm.personalise import load_adapted
from sharedllm.quant.make import DEFAULT_METHOD, REPAIR_STEPS, ternarise
from sharedllm.quant.ptq import PTQConfig
from sharedllm.machine import cpu_model
from sharedllm.train import TrainConfig, bf16_matmuls, hold_frozen_in_bf16

from . import common
from .cells import scored

QUICK = {"steps": 3, "batch": 2, "seq": 32, "lr": 5e-3, "text_len": 64, "window": 32}
QUICK_QUANTIZE = {"calib_seqs": 2, "calib_len": 32, "repair_steps": 2}
WINDOW = 256
_DATA: dict = {}  # (tokenizer id, file) -> UserData, shared by bets run in one process


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on `path`.lock: read-modify-write of a file shared by several workers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class ScoreCache:
    """A JSON file of summed NLLs: scoring the same adapter on the same text twice costs nothing."""

    FLUSH_S = 30.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.dirty, self.flushed = False, time.monotonic()

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.dirty = True
        if time.monotonic() - self.flushed > self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.dirty:  # merge with what other workers wrote meanwhile
            with locked(self.path):
                if self.path.is_file():
                    self.data = {**json.loads(self.path.read_text()), **self.data}
                write_text_atomic(self.path, json.dumps(self.data, indent=0, sort_keys=True))
        self.dirty, self.flushed = False, time.monotonic()


class Checkpoint:
    """Finished units of a long bet, written after each one to results/partial/<bet>.json (committed with the
    results), so a run that is cut off, or continued in another session on another machine, resumes where it
    stopped. The file is stamped with the run's configuration; a different configuration starts it afresh.

    Only the driver writes it (units run on Ray return their output to the driver). Units that failed for good
    are listed under "failed" with their error; a later run tries them again."""

    def __init__(self, path: Path, stamp: dict, fresh: bool = False):
        self.path, self.stamp = Path(path), stamp
        self._seen, self._data = None, {}  # the file's (mtime, size) when last parsed, and what it held
        if fresh:
            self.path.unlink(missing_ok=True)
        elif self._file() == {} and self.path.is_file():
            say(f"{self.path}: written for another configuration; starting afresh")
            self.path.unlink()
        self.reused: list = []  # units taken from earlier runs
        self.computed: set = set()  # units this run computed (inline or on Ray)

    def _file(self) -> dict:
        """The file's contents (parsed again only when it changed: a Ray driver asks for every unit after each
        one lands), or {} when it is missing or stamped for another configuration."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        seen = (st.st_mtime_ns, st.st_size)
        if self._seen != seen:
            self._seen, self._data = seen, json.loads(self.path.read_text())
        return self._data if self._data.get("stamp") == self.stamp else {}

    def _read(self) -> dict:
        return self._file().get("units", {})

    def units(self) -> dict:
        """key -> output of every finished unit."""
        return self._read()

    def failed(self) -> dict:
        return self._file().get("failed", {})

    def get(self, key: str):
        hit = self._read().get(key)
        if hit is not None and key not in self.reused and key not in self.computed:
            self.reused.append(key)
        return hit

    def put(self, key: str, value: dict) -> None:
        self.computed.add(key)
        failed = {k: v for k, v in self.failed().items() if k != key}
        self._write({**self._read(), key: value}, failed)

    def fail(self, key: str, error: str) -> None:
        self._write(self._read(), {**self.failed(), key: error})

    def _write(self, units: dict, failed: dict) -> None:
        data = {"stamp": self.stamp, "units": units, **({"failed": failed} if failed else {})}
        write_text_atomic(self.path, json.dumps(data, indent=0) + "\n")

    def wall_s(self) -> float:
        return sum(u.get("wall_s", 0.0) for u in self._read().values())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class NoCheckpoint(Checkpoint):
    """A Ray worker's: it computes the one unit it was sent and returns it; the driver checkpoints it. It reads
    the units the driver had finished when it sent the task, so a unit that depends on others' cells (a
    confusion row at the tuned lr) can be reached."""

    def __init__(self, units: dict | None = None):
        self.path, self.stamp, self.reused, self.computed = Path("/nonexistent"), {}, [], set()
        self.done = dict(units or {})

    def _file(self) -> dict:
        return {"units": self.done}

    def _write(self, units: dict, failed: dict) -> None:
        pass


class UnitDone(BaseException):
    """Raised in a Ray worker once its target unit is computed (args: key, output): the rest of the bet's run()
    is not needed. A BaseException, so that a bet's `except Exception` cannot swallow it."""


class Context:
    def __init__(self, bet, opts, base=None, checkpoint=None):
        self.bet, self.opts, self.quick = bet, opts, opts.quick
        self._base = base  # loaded when first needed: a Ray driver often never needs the weights
        self._known = None if base is not None else peek(opts.base_spec)
        self.text_len = QUICK["text_len"] if self.quick else (opts.eval_len or common.EVAL_LEN)
        self.n_texts = common.EVAL_TEXTS
        self.window = QUICK["window"] if self.quick else WINDOW
        self.extras, self.notes, self.users_used, self.seeds_used = {}, {}, [], set()
        self._held: tuple = (None, None)
        self._sha: dict = {}
        self._said: set = set()
        self.deferred: list | None = None  # enumerating for Ray: units not in the checkpoint, left undone
        self.target: str | None = None  # a Ray worker: the one unit to compute (the rest are skipped)
        self.cache = ScoreCache(Path(opts.out) / "scores" / f"{self.fingerprint[:16]}.json")
        self.checkpoint = checkpoint or Checkpoint(opts.result_dir() / "partial" / f"{bet.name}.json",
                                                   self._stamp(), opts.force)

    @property
    def base(self):
        if self._base is None:
            say(f"bet {self.bet.name}: loading base {self.opts.base_spec} on {self.opts.device}")
            self._base = load_base(self.opts.base_spec, self.opts.device)
            if self.opts.frozen_bf16:
                freed = hold_frozen_in_bf16(self._base.model)
                say(f"bet {self.bet.name}: the base's matmul weights held in bf16 ({freed / 2**30:.2f} GiB freed)")
            if self.opts.dtype == "bf16":
                say(f"bet {self.bet.name}: bf16 matmuls {bf16_matmuls(self.opts.device)} on this machine")
        return self._base

    @property
    def fingerprint(self) -> str:
        return self._known[1] if self._base is None and self._known else self.base.fingerprint

    @property
    def base_name(self) -> str:
        return self._known[0] if self._base is None and self._known else self.base.name

    def _stamp(self) -> dict:
        cfg = self.train_config(0).to_json()
        return {"bet": self.bet.name, "version": self.bet.version, "base_fingerprint": self.fingerprint,
                "train": {k: cfg[k] for k in ("steps", "batch", "seq", "lr", "betas", "weight_decay")},
                "eval": [self.n_texts, self.text_len, self.window], "corpora": Path(self.opts.corpora).name,
                **self._dtype_note()}

    def _dtype_note(self) -> dict:
        """{"dtype": ...} when not fp32 (stamp and config): fp32 runs keep the stamp and config they always had;
        plus {"frozen_bf16": true} with --frozen-bf16 (LoRA's init differs in rounding: no mixing in a checkpoint)."""
        note = {} if self.opts.dtype == "fp32" else {"dtype": self.opts.dtype}
        return {**note, "frozen_bf16": True} if self.opts.frozen_bf16 else note

    def autocast(self):
        """The compute dtype (--dtype) for what a bet runs on the models itself (Bet 55's ensemble): training and
        scoring through this context already use it."""
        return common.autocast(self.opts.dtype, self.opts.device)

    def unit(self, key: str, compute) -> list:
        """Cells of one resumable unit of work (e.g. train one adapter and score it): computed once, then
        checkpointed with the loss curves it recorded; a resumed run takes them from the checkpoint.

        With Ray, run() is called in passes: the driver first enumerates (units not checkpointed yet go to
        `deferred` and give no cells), each worker then runs it with a `target` and computes only that unit,
        and a last pass on the driver assembles every cell from the checkpoint."""
        done = self.checkpoint.get(key)
        if done is None and self.deferred is not None:
            self.deferred.append(key)
            return []
        if done is None and self.target is not None and key != self.target:
            return []
        if done is None:
            done = self._compute(compute)
            if self.target is not None:
                raise UnitDone(key, done)
            self.checkpoint.put(key, done)
        else:
            if key not in self.checkpoint.computed and self.target is None and key not in self._said:
                self._said.add(key)  # once: a Ray driver enumerates again as each unit lands
                say(f"{key}: reused from {self.checkpoint.path}")
            self.users_used.extend(u for u in done["users"] if u not in self.users_used)
            self.seeds_used.update(done["seeds"])
        self.extras.setdefault("loss_curves", {}).update(done["curves"])
        return [dict(c) for c in done["cells"]]

    def _compute(self, compute) -> dict:
        """Run one unit; what it adds to the loss curves, users and seeds is recorded with its cells."""
        start, before = time.time(), set(self.extras.get("loss_curves", {}))
        users, seeds = len(self.users_used), set(self.seeds_used)
        cells = compute()
        curves = {k: v for k, v in self.extras.get("loss_curves", {}).items() if k not in before}
        return {"cells": cells, "curves": curves, "users": self.users_used[users:],
                "seeds": sorted(self.seeds_used - seeds), "wall_s": round(time.time() - start, 1),
                "machine": self.machine()}

    def machine(self) -> str:
        """Where a unit ran (the units of one run may land on different machines): the CPU or GPU and, for bf16,
        whether its matmuls ran native or emulated (sharedllm.machine.bf16_matmuls)."""
        device = self.opts.device
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        where = torch.cuda.get_device_name(torch.device(device)) if cuda else cpu_model()
        return where + (f", bf16 matmuls {bf16_matmuls(device)}" if self.opts.dtype == "bf16" else "")

    # ---- configuration recorded in the result ----
    def train_config(self, seed: int = 0, lr: float | None = None) -> TrainConfig:
        """The bet's training budget; `lr` overrides the learning rate (a bet that sweeps it, e.g. lr_sensitivity).
        Reading it records nothing: a seed is recorded where an adapter is trained or taken with it (`adapter`,
        `train_together`), so the result's `seeds` are the seeds its adapters used."""
        if self.quick:
            return TrainConfig(steps=QUICK["steps"], batch=QUICK["batch"], seq=QUICK["seq"], lr=lr or QUICK["lr"],
                               seed=seed)
        return TrainConfig(seed=seed) if lr is None else TrainConfig(seed=seed, lr=lr)

    def config(self) -> dict:
        cfg = self.train_config(0).to_json()
        return {"base": self.base_name, "base_spec": self.opts.base_spec, "base_fingerprint": self.fingerprint,
                "users": self.users_used, "steps": cfg["steps"], "batch": cfg["batch"], "seq": cfg["seq"],
                "lr": cfg["lr"], "betas": cfg["betas"], "weight_decay": cfg["weight_decay"],
                "seeds": sorted(self.seeds_used), "eval": {"texts": self.n_texts, "tokens_per_text": self.text_len,
                                                          "window": self.window, "split": "last 20 % by position"},
                "corpora": Path(self.opts.corpora).name, "device": self.opts.device, "quick": self.quick,
                **self._dtype_note(), **self.notes}

    # ---- data ----
    def user_path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_file() or p.is_dir() else common.user_file(self.opts.corpora, rel)

    def data(self, rel: str):
        if rel not in self.users_used:
            self.users_used.append(rel)
        key = (self.base.name, type(self.base.tokenizer).__name__, str(self.user_path(rel)))
        if key not in _DATA:
            _DATA[key] = load_user(self.user_path(rel), self.base.tokenizer)
        return _DATA[key]

    def texts(self, rel: str) -> list:
        from sharedllm.data import disjoint_slices

        return disjoint_slices(self.data(rel).heldout, self.n_texts, self.text_len)

    def dev_text(self, rel: str) -> torch.Tensor:
        """The user's development slice: held-out tokens after the eval texts, for every choice a bet makes."""
        from sharedllm.data import dev_slice

        return dev_slice(self.data(rel).heldout, self.n_texts, self.text_len)

    def random_tokens(self, rel: str, seed: int = 0) -> torch.Tensor:
        """Uniform random token ids, as many as the user's training pool (the noise-floor control)."""
        vocab = min(self.base.tokenizer.vocab_size, self.base.model.config.vocab_size)
        gen = torch.Generator().manual_seed(10_000 + seed)
        return torch.randint(0, vocab, (len(self.data(rel).train),), generator=gen)

    # ---- adapters ----
    def adapter(self, rel: str, method: str = "norm", seed: int = 0, tag: str = "", tokens=None, base=None,
                lr: float | None = None) -> Path:
        """The cached adapter for (user, method, seed, tag, lr) on `base` (default: this bet's base); trains once."""
        base = base or self.base
        tokens = self.data(rel).train if tokens is None else tokens
        cfg = self.train_config(seed, lr)
        self.seeds_used.add(seed)
        dtype = self.opts.dtype
        if not common.adapter_path(base, rel, method, cfg, tag, self.opts.out, dtype).is_file():
            how = "" if dtype == "fp32" else f", {dtype}"
            say(f"training {method}{tag} for {rel} (seed {seed}, {cfg.steps} steps{how})")
        return common.ensure_adapter(base, rel, tokens, method, cfg, tag, root=self.opts.out, dtype=dtype)

    def train_together(self, key: str, specs: list, needed: list) -> bool:
        """Norm adapters of several users (`specs`: dicts of rel, and optionally seed, lr, tag, tokens (a tensor or a
        function of rel)) trained in one pass, as unit `key`, so that the units that score them find them trained
        (`ensure_norm_adapters`). `needed`:
        whether each one's scoring unit is still to run (a pass whose adapters are all used already is skipped).
        True when those units may run now: the pass is done, or failed (each is then trained alone), or not needed,
        or fleets are off (--fleet 1); False while a Ray driver has still to send it (its units come in a later pass).
        Used where several users' norm adapters share a base and a budget (scale_protocol, chat_cohort)."""
        if self.opts.fleet < 2 or len(specs) < 2:
            return True
        self.notes["fleet"] = (f"norm adapters not yet on disk are trained up to {self.opts.fleet} users per pass "
                               "(sharedllm.fleet; equal to training alone up to float rounding); the sidecar of one "
                               "trained so records its pass under `fleet`")
        if not any(needed):
            return True
        self.unit(key, lambda: self._train_together(specs))
        if self.target is not None:  # a Ray worker sent a unit that uses them: the driver decided it may run
            return True
        return self.checkpoint.get(key) is not None or key in self.checkpoint.failed()

    def _train_together(self, specs: list) -> list:
        from .common import AdapterSpec, ensure_norm_adapters

        def tokens(s: dict) -> torch.Tensor:
            given = s.get("tokens")
            return self.data(s["rel"]).train if given is None else given(s["rel"]) if callable(given) else given

        items = [AdapterSpec(s["rel"], tokens(s), self.train_config(s.get("seed", 0), s.get("lr")), s.get("tag", ""))
                 for s in specs]
        self.seeds_used.update(s.get("seed", 0) for s in specs)
        ensure_norm_adapters(self.base, items, self.opts.out, self.opts.dtype)
        return []  # no cells: the adapter files under --out are what the scoring units need

    def curve(self, key: str, path: Path) -> dict:
        side = common.sidecar(path)
        self.extras.setdefault("loss_curves", {})[key] = [round(x, 4) for x in side["losses"]]
        return side

    def model(self, path: Path | None):
        """The base (path None) or the base with the adapter at `path`; one adapted copy is held at a time."""
        if path is None:
            return self.base.model
        if self._held[0] != str(path):
            self._held = (None, None)
            self._held = (str(path), load_adapted(self.base, path).model)
        return self._held[1]

    def release(self) -> None:
        self._held = (None, None)
        self.cache.flush()

    # ---- scoring ----
    def windows(self, text: torch.Tensor) -> torch.Tensor:
        return eval_windows(text, self.window)

    def score_model(self, model, text: torch.Tensor) -> tuple[float, int]:
        w = self.windows(text)
        with self.autocast():
            return score_windows(model, w), int(w[:, 1:].numel())

    @property
    def _dtype_key(self) -> str:
        """What a score cache key adds for a compute dtype other than fp32 (fp32 keys are as they always were)."""
        return "" if self.opts.dtype == "fp32" else f"|{self.opts.dtype}"

    def _file_key(self, path: Path | None) -> str:
        if path is None:
            return "base"
        if str(path) not in self._sha:
            self._sha[str(path)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        return self._sha[str(path)]

    def score(self, path: Path | None, rel: str, idx: int, probe: str = "", wrap=None) -> tuple[float, int]:
        """Summed NLL and token count of eval text `idx` of user `rel` under the adapter file (or the base).

        `wrap(model, idx)` is an optional context manager (e.g. noise hooks) named by `probe` in the cache key."""
        key = (f"{self._file_key(path)}|{rel}|{idx}/{self.n_texts}x{self.text_len}|w{self.window}|{probe}"
               f"{self._dtype_key}")
        hit = self.cache.get(key)
        if hit is None:
            model = self.model(path)
            if wrap is None:
                hit = list(self.score_model(model, self.texts(rel)[idx]))
            else:
                with wrap(model, idx):
                    hit = list(self.score_model(model, self.texts(rel)[idx]))
            self.cache.put(key, hit)
        return float(hit[0]), int(hit[1])

    def score_dev(self, path: Path | None, rel: str) -> tuple[float, int]:
        """Summed NLL and token count of the user's dev slice under the adapter file (or the base)."""
        key = f"{self._file_key(path)}|{rel}|dev{self.n_texts}x{self.text_len}|w{self.window}|{self._dtype_key}"
        hit = self.cache.get(key)
        if hit is None:
            hit = list(self.score_model(self.model(path), self.dev_text(rel)))
            self.cache.put(key, hit)
        return float(hit[0]), int(hit[1])

    def score_cells(self, path: Path | None, rel: str, probe: str = "", wrap=None, **condition) -> list:
        """One scored cell per eval text of `rel` under `path`; `condition` names the cell."""
        return [scored(*self.score(path, rel, i, probe, wrap), text=i, **condition) for i in range(self.n_texts)]

    def derived_adapter(self, name: str, method: str, state: dict) -> Path:
        """Save an adapter computed from others (e.g. an average) so that it is scored and cached like any other."""
        from sharedllm.personalise import new_adapter, save_adapted
        from sharedllm.adapters import load_state

        adapted = new_adapter(self.base, method)
        load_state(adapted.params, state, name)
        name += "" if self.opts.dtype == "fp32" else f"_{self.opts.dtype}"  # from adapters trained in that dtype
        path = Path(self.opts.out) / "adapters" / self.base.fingerprint[:16] / "derived" / f"{name}.safetensors"
        return save_adapted(adapted, path, self.base, info={"derived": name})

    def rebased(self, base) -> "Context":
        """The same bet and options on another base (e.g. the ternary one), with that base's score cache."""
        other = Context(self.bet, self.opts, base=base, checkpoint=self.checkpoint)
        other.users_used, other.seeds_used, other.extras = self.users_used, self.seeds_used, self.extras
        other.deferred, other.target = self.deferred, self.target
        return other

    def ternary_target(self) -> Path:
        """Where this base's default ternary file is (or will be) written under --out."""
        return Path(self.opts.out) / "ternary" / self.fingerprint[:16] / "quantize_default.safetensors"

    def ternary_file(self) -> Path:
        """The ternary base: --ternary FILE, else `sharedllm quantize` of this base with its default method,
        written once under out/ternary/ (a make-style target shared by bets 13, 52 and scale_protocol)."""
        if self.opts.ternary:
            self.notes["ternary_file"] = str(self.opts.ternary)
            self.notes["ternary"] = ternary_record(Path(self.opts.ternary))
            return Path(self.opts.ternary)
        path = self.ternary_target()
        if not path.is_file():
            say(f"quantising base {self.opts.base_spec} to {path} (sharedllm quantize, default method)")
            cfg = PTQConfig(**QUICK_QUANTIZE) if self.quick else PTQConfig(repair_steps=REPAIR_STEPS)
            path.parent.mkdir(parents=True, exist_ok=True)
            info = ternarise(self.opts.base_spec, path, DEFAULT_METHOD,
                             common.user_file(self.opts.corpora, common.GENERAL), cfg, self.opts.device)
            write_text_atomic(path.with_suffix(".json"), json.dumps(info, indent=1, default=str))
        self.notes["ternary_file"] = str(path)
        self.notes["ternary"] = ternary_record(path)
        return path


TERNARY_RECORD = ("method", "params", "fingerprint", "source_fingerprint", "source_name", "bits_per_weight",
                  "quantize_wall_s", "version")


def ternary_record(path: Path) -> dict:
    """What a result records about the ternary base it used: the quantize settings (method and every parameter),
    the ternary file's own fingerprint and its source base's, read from the file's header (not its tensors)."""
    meta = wire.read_file_header(path)[1] or {}
    return {k: meta[k] for k in TERNARY_RECORD if k in meta}
