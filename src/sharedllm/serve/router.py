"""Route every request to its own user's gains and gather concurrent requests into shared forward passes.

`Router` owns the base (as a RowGainModel), the adapter store and an LRU cache of decoded gains keyed by the
adapter file's sha256. Validation of uploaded bytes is the CLI's, word for word (`wire.parse_file`,
`check_binding`, `decode_adapter` against the norm layout of this base), plus a size limit and the rule that
only norm adapters are served. `Batcher` runs on one worker thread: it waits a short window after the oldest
queued request, takes up to `max_batch` requests of the same kind and runs them as one batch.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import wire
from ..adapters import get_method
from ..base import Base
from ..errors import SharedLLMError
from ..store import AdapterStore
from .compute import generate_batch, score_batch
from .rowgains import Gains, RowGainModel

SERVED_METHOD = "norm"


class NoAdapter(SharedLLMError):
    """The user has no adapter stored (HTTP 404)."""


class TooLarge(SharedLLMError):
    """An upload over the size limit (HTTP 413)."""


class LRU:
    def __init__(self, capacity: int):
        self.capacity, self._d, self._lock = capacity, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


@dataclass
class Job:
    kind: str  # "score" | "generate"
    ids: list[int]
    gains: Gains
    max_tokens: int = 0
    temperature: float = 0.0
    seed: int | None = None
    future: Future = field(default_factory=Future)
    t: float = field(default_factory=time.monotonic)


class Batcher:
    """One worker thread; requests of one kind that arrive within `window_s` of each other share a batch.

    A batch holds at most `max_batch` rows and `max_batch_tokens` padded positions (this bounds the memory of
    the logits: positions x vocabulary x 4 bytes); whatever does not fit waits for the next batch."""

    def __init__(self, run: dict, window_s: float = 0.01, max_batch: int = 16, max_batch_tokens: int = 16384):
        self.run, self.window_s, self.max_batch, self.max_batch_tokens = run, window_s, max_batch, max_batch_tokens
        self._q: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self.batches = self.rows = self.largest = 0
        self._thread = threading.Thread(target=self._loop, name="sharedllm-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stop:
                raise SharedLLMError("server is shutting down")
            self._q.append(job)
            self._cv.notify()
        return job.future

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._q and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            kind = self._q[0].kind
            deadline = self._q[0].t + self.window_s
            while sum(j.kind == kind for j in self._q) < self.max_batch and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = self._fit([j for j in self._q if j.kind == kind])
            for j in batch:
                self._q.remove(j)
            return batch

    def _fit(self, jobs: list[Job]) -> list[Job]:
        """The oldest jobs that fit: at most max_batch rows and rows x padded length <= max_batch_tokens."""
        batch, width = [], 0
        for j in jobs[: self.max_batch]:
            w = max(width, len(j.ids) + j.max_tokens)
            if batch and (len(batch) + 1) * w > self.max_batch_tokens:
                break
            batch.append(j)
            width = w
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batches, self.rows = self.batches + 1, self.rows + len(batch)
            self.largest = max(self.largest, len(batch))
            try:
                results = self.run[batch[0].kind](batch)
            except Exception as e:  # one failing batch must not kill the worker
                for j in batch:
                    j.future.set_exception(e)
                continue
            for j, r in zip(batch, results):
                j.future.set_result(r)

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest, "queued": len(self._q)}


class Router:
    def __init__(self, base: Base, store: AdapterStore, window_s: float = 0.01, max_batch: int = 16,
                 cache_size: int = 1024, max_adapter_bytes: int | None = None, max_batch_tokens: int = 16384):
        self.base, self.store = base, store
        self.model = RowGainModel(base)
        self.layout = wire.layout_of(get_method(SERVED_METHOD).trainable(base.model))
        params = sum(v.numel() for v in self.model.base_gains.vectors)
        self.max_adapter_bytes = max_adapter_bytes or params * 4 + (1 << 20)
        self.cache = LRU(cache_size)
        self._base_state = dict(base.model.named_parameters())
        self.batcher = Batcher({"score": self._run_score, "generate": self._run_generate}, window_s, max_batch,
                               max_batch_tokens)

    def close(self) -> None:
        self.batcher.close()

    # ---- adapters ----------------------------------------------------------------------------------------
    def validate(self, data: bytes, source: str) -> tuple[dict, dict]:
        """Bytes -> (metadata, named fp32 tensors), refused exactly as `sharedllm eval --adapter` refuses them."""
        if len(data) > self.max_adapter_bytes:
            raise TooLarge(f"{source}: {len(data)} bytes is over this server's limit of {self.max_adapter_bytes}")
        tensors, meta = wire.parse_file(data, source)
        if meta.get("method") != SERVED_METHOD:
            raise SharedLLMError(f"{source}: method {meta.get('method')!r} is refused; this server serves only "
                                 f"norm adapters (RMSNorm gains, fp16 or int8), which can share a batch")
        wire.check_binding(meta, self.base.fingerprint, source)
        named = wire.decode_adapter(tensors, meta, self.layout, self._base_state, source)
        return meta, named

    def upload(self, user: str, data: bytes):
        meta, named = self.validate(data, f"adapter upload for user {user!r}")
        rec = self.store.put(user, data, meta)
        self.cache.put(rec.sha256, self.model.gains_from(named, rec.sha256))
        return rec

    def file_meta(self, sha256: str) -> dict:
        """The full metadata in a stored adapter's header (the index keeps only a few fields per row)."""
        _, meta = wire.parse_file(self.store.read(sha256), f"stored adapter {sha256[:16]}")
        return meta

    def gains_for(self, user: str, adapter: str = "user") -> Gains:
        """The gains a request of `user` runs with; adapter="none" asks explicitly for the bare base."""
        if adapter == "none":
            return self.model.base_gains
        rec = self.store.get(user)
        if rec is None:
            raise NoAdapter(f"user {user!r} has no adapter; upload one with PUT /v1/users/{user}/adapter, "
                            'or send "adapter": "none" to use the bare base explicitly')
        gains = self.cache.get(rec.sha256)
        if gains is None:
            _, named = self.validate(self.store.read(rec.sha256), f"stored adapter of user {user!r}")
            gains = self.model.gains_from(named, rec.sha256)
            self.cache.put(rec.sha256, gains)
        return gains

    # ---- requests ----------------------------------------------------------------------------------------
    def prompt_ids(self, text: str, field_name: str) -> list[int]:
        tok = self.base.tokenizer
        ids = ([tok.bos_id] if getattr(tok, "bos_id", None) is not None else []) + tok.encode(text)
        limit = self.context_limit()
        if len(ids) > limit:
            raise SharedLLMError(f"{field_name}: {len(ids)} tokens is over the model's context of {limit}")
        return ids

    def context_limit(self) -> int:
        return int(getattr(self.base.model.config, "max_position_embeddings", 2048))

    def score(self, ids: list[int], gains: Gains) -> Future:
        if len(ids) < 2:
            raise SharedLLMError("text: nothing to score (need at least one token after the first)")
        return self.batcher.submit(Job("score", ids, gains))

    def generate(self, ids: list[int], gains: Gains, max_tokens: int, temperature: float, seed) -> Future:
        if len(ids) + max_tokens > self.context_limit():
            raise SharedLLMError(f"prompt + max_tokens = {len(ids) + max_tokens} tokens is over the model's "
                                 f"context of {self.context_limit()}")
        if not ids:
            raise SharedLLMError("prompt: empty prompt on a tokenizer without a BOS token")
        return self.batcher.submit(Job("generate", ids, gains, max_tokens, temperature, seed))

    def _run_score(self, jobs: list[Job]):
        return score_batch(self.model, [j.ids for j in jobs], [j.gains for j in jobs])

    def _run_generate(self, jobs: list[Job]):
        return generate_batch(self.model, [j.ids for j in jobs], [j.gains for j in jobs], [j.max_tokens for j in jobs],
                              [j.temperature for j in jobs], [j.seed for j in jobs],
                              getattr(self.base.tokenizer, "eos_id", None))

    def stats(self) -> dict:
        return {**self.batcher.stats(), "cache_entries": len(self.cache), "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses}
