"""Continuous batching: one engine thread decodes every active generation one token per step; between steps,
finished and abandoned rows leave, waiting score requests run, and new generations join.

Each row keeps its own adapter (a `RowState`: norm gains, LoRA, ...) and its own KV history (`kv.BatchCache`: left-padded, per-row past length), so a
row's tokens are those it would get alone, and a short request is never held by a long one. Waiting requests
sit in per-user queues taken round-robin (`FairQueue`): one user's burst cannot starve another user, and a
user's generations hold at most `max_rows_per_user` of the `max_batch` rows (default half), even when nobody
else waits (no row is taken back once given, so rows a lone user could fill would be missing when another user
arrives): another user's generation finds a free row at the next admission. A score waits at most one decode
step and one admission: a burst of prompts joins over several steps, at most
`prefill_budget` padded prompt positions per admission (a longer single prompt is admitted alone). An idle
engine waits `window_s` after the first request for others to share its first forward pass (the old batch window,
now only at the start of a busy period). A request whose future
was cancelled (its client went away) is skipped while waiting and dropped from the batch at the next step; the
engine also polls the active rows' connections at every step, before computing (`hangup`), so a client that
closes its connection frees its row at the next step even while the event loop lags behind. A
failure fails only the requests it touched: a prefill or score batch that raises is retried row by row; sampling
or streaming errors fail only their row. A user may have at most `max_queued_per_user` requests waiting or
running (`Busy`, HTTP 429 with Retry-After, beyond). `stats()` counts decode steps, generating rows, cancelled
rows and failed rows (`/health`), and `cancel_lag_steps_max`: the most decode steps any row ran between its
cancellation (the disconnect noticed here or by the HTTP side) and leaving the batch (at most 1: the step in
progress).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.rows import RowModel, RowState
from ..errors import SharedLLMError
from .compute import Generated, decode_step, pick, prefill, score_batch, step_logprobs
from .fastdecode import LeanDecoder
from .hangup import hung_up
from .kv import BatchCache
from .textstream import TextTail


class Busy(SharedLLMError):
    """Too many queued or running requests of one user (HTTP 429)."""


@dataclass
class Job:
    kind: str  # "score" | "generate"
    ids: list[int]
    row: RowState
    user: str = ""
    max_tokens: int = 0
    temperature: float = 0.0
    seed: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # streaming: called on the engine thread with each final piece
    conn: object | None = None  # the client's socket, polled by the engine (`hangup`); None: not known
    future: Future = field(default_factory=Future)
    t: float = field(default_factory=time.monotonic)
    cancel_step: int | None = None  # the engine's decode-step count when the job was cancelled
    drop_step: int | None = None  # ... when its row left the batch, cancelled
    # k (0..5): a score also returns each token's logprob and the top k per position; a generation records each
    # token's (id, logprob, top k) from the logits its sampler sees (`compute.step_logprobs`), and streams it
    # through `on_logprob` (engine thread, before the text that token completes); None: none of that
    logprobs: int | None = None
    on_logprob: Callable[[tuple], None] | None = None
    ignore_eos: bool = False  # the end-of-text token does not end the row (it is decoded like any other)


@dataclass
class Row:
    job: Job
    tail: TextTail
    gen: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    t_last: float = 0.0
    finish: str = "length"
    logprobs: list = field(default_factory=list)  # (id, logprob, top k) per token, when the job asks for them


class FairQueue:
    """Waiting jobs, one FIFO per user; `take` serves the users in turn, the least recently served first."""

    def __init__(self):
        self._q: OrderedDict[str, deque] = OrderedDict()
        self.cancelled = 0  # jobs skipped because their client left while they waited

    def push(self, job: Job) -> None:
        self._q.setdefault(job.user, deque()).append(job)

    def __len__(self) -> int:
        return sum(len(q) for q in self._q.values())

    def take(self, n: int, fits: Callable[[list, Job], bool] = lambda batch, job: True,
             quota: Callable[[str], int] | None = None) -> list[Job]:
        """Up to `n` jobs, one user at a time; `fits(batch, job)` False ends the batch; `quota(user)`: how many jobs
        of `user` this take may return (a user at its quota keeps its place and its queue)."""
        out: list[Job] = []
        taken: Counter = Counter()
        while len(out) < n and self._q:
            took = False
            for user in list(self._q):
                q = self._q[user]
                while q and (q[0].future.cancelled() or _left(q[0])):  # the client left while waiting
                    q.popleft().future.cancel()
                    self.cancelled += 1
                if q and len(out) < n and (quota is None or taken[user] < quota(user)):
                    if out and not fits(out, q[0]):
                        return self._prune(out)
                    out.append(q.popleft())
                    taken[user] += 1
                    took = True
                    self._q.move_to_end(user)
                if not q:
                    del self._q[user]
            if len(out) >= n or not took:
                break
        return self._prune(out)

    def _prune(self, out: list[Job]) -> list[Job]:
        for user in [u for u, q in self._q.items() if not q]:
            del self._q[user]
        return out


def _left(job: Job) -> bool:
    return job.conn is not None and hung_up([job.conn])[0]


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    try:
        job.future.set_exception(error) if error is not None else job.future.set_result(result)
    except InvalidStateError:  # cancelled by its client meanwhile
        pass


class Engine:
    def __init__(self, rgm: RowModel, decode: Callable, eos_id: int | None, max_batch: int = 16,
                 max_batch_tokens: int = 16384, metrics=None, window_s: float = 0.0, max_queued_per_user: int = 32,
                 lean: LeanDecoder | None | str = "auto", prefill_budget: int = 512,
                 max_rows_per_user: int | None = None):
        self.rgm, self.decode, self.eos_id, self.window_s = rgm, decode, eos_id, window_s
        # decode rows one user's generations may hold at once (None: half the batch, at least 1)
        self.max_rows_per_user = min(max_batch, max_rows_per_user or max(1, max_batch // 2))
        self.prefill_budget = prefill_budget  # padded prompt positions admitted between two steps (one prompt: any)
        # decode steps: the lean step (fp32) where the architecture allows, else the HF forward (compute.py)
        self.lean = LeanDecoder.build(rgm) if lean == "auto" else lean
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.max_queued_per_user = max_queued_per_user
        self._load: dict[str, int] = {}  # per user: requests waiting or running (until their future is done)
        self.metrics = metrics or _Quiet()
        self.scores, self.gens = FairQueue(), FairQueue()
        self.rows: list[Row] = []
        self.kv = self.lean.new_cache() if self.lean else BatchCache()
        self.logits: torch.Tensor | None = None  # next-token logits of each active row
        self._stacked = None  # the active rows' RowBatch (rebuilt when rows join or leave)
        self._cv = threading.Condition()
        self._stop = False
        self.batches = self.largest = self.steps = self.rows_total = 0
        self.dropped = self.failed_rows = 0  # rows dropped while running (client gone); rows that failed
        self.cancel_lag_max = 0  # the most decode steps a row ran after its cancellation
        self.most_rows_one_user = 0  # the most rows one user's generations held at once
        self._thread = threading.Thread(target=self._loop, name="sharedllm-engine", daemon=True)
        self._thread.start()

    # ---- the request side --------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stop:
                raise SharedLLMError("server is shutting down")
            if self._load.get(job.user, 0) >= self.max_queued_per_user:
                raise Busy(f"user {job.user!r} already has {self.max_queued_per_user} requests queued or running; "
                           f"retry when some have finished")
            self._load[job.user] = self._load.get(job.user, 0) + 1
            job.future.add_done_callback(lambda _f, user=job.user: self._release(user))
            job.future.add_done_callback(lambda f, j=job: f.cancelled() and setattr(j, "cancel_step", self.steps))
            (self.scores if job.kind == "score" else self.gens).push(job)
            self._cv.notify()
        return job.future

    def _release(self, user: str) -> None:
        with self._cv:
            left = self._load.get(user, 0) - 1
            if left > 0:
                self._load[user] = left
            else:
                self._load.pop(user, None)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        with self._cv:  # nobody will answer these now
            waiting = [j for q in (self.scores, self.gens) for j in q.take(len(q))] + [r.job for r in self.rows]
        for j in waiting:
            _resolve(j, error=SharedLLMError("server is shutting down"))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows_total, "largest_batch": self.largest,
                "decode_steps": self.steps, "active_rows": len(self.rows),
                "generating_rows": sum(not r.job.future.done() for r in self.rows),
                "queued": len(self.scores) + len(self.gens),
                "cancelled_rows": self.dropped + self.scores.cancelled + self.gens.cancelled,
                "failed_rows": self.failed_rows, "cancel_lag_steps_max": self.cancel_lag_max,
                "max_rows_per_user": self.max_rows_per_user, "most_rows_one_user": self.most_rows_one_user,
                "decode": self.lean.name if self.lean else "hf"}

    # ---- the engine thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._wait():
            try:
                self._run_scores()
                self._admit()
                self._sample()
                if self.rows:
                    self._decode()
            except Exception as e:  # a failed decode step fails the rows in it; the engine goes on
                self.failed_rows += len(self.rows)
                for row in self.rows:
                    _resolve(row.job, error=e)
                self._keep([])

    def _wait(self) -> bool:
        with self._cv:
            while not self._stop and not self.rows and not len(self.scores) and not len(self.gens):
                self._cv.wait()
            if not self.rows and self.window_s > 0:  # idle engine: let concurrent requests share the first pass
                deadline = time.monotonic() + self.window_s
                while not self._stop and len(self.scores) + len(self.gens) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            return not self._stop

    def _batch(self, n: int) -> None:
        self.batches, self.rows_total, self.largest = self.batches + 1, self.rows_total + n, max(self.largest, n)

    def _tokens_fit(self, width_of: Callable[[Job], int], limit: int | None = None):
        def fits(batch: list[Job], job: Job) -> bool:
            return (len(batch) + 1) * max(width_of(j) for j in batch + [job]) <= (limit or self.max_batch_tokens)
        return fits

    def _isolated(self, jobs: list[Job], fn: Callable) -> list[tuple[list[Job], object]]:
        """[(jobs, fn(jobs))]; if the batch raises, each job alone, failing only those that raise again."""
        try:
            return [(jobs, fn(jobs))]
        except Exception as e:
            if len(jobs) == 1:
                self.failed_rows += 1
                _resolve(jobs[0], error=e)
                return []
        out = []
        for j in jobs:
            out += self._isolated([j], fn)
        return out

    def _run_scores(self) -> None:
        with self._cv:
            jobs = self.scores.take(self.max_batch, self._tokens_fit(lambda j: len(j.ids)))
        if not jobs:
            return
        self._batch(len(jobs))

        def run(js: list[Job]):  # per-position logprobs only for the jobs that ask (the sums are the same)
            top = [j.logprobs for j in js]
            kw = {"top": top} if any(k is not None for k in top) else {}
            return score_batch(self.rgm, [j.ids for j in js], [j.row for j in js], **kw)

        for group, results in self._isolated(jobs, run):
            for j, r in zip(group, results):
                _resolve(j, r)
                self.metrics.scored(r.tokens)

    def _admit(self) -> None:
        room = self.max_batch - len(self.rows)
        if room <= 0:
            return
        held = Counter(r.job.user for r in self.rows)  # rows in the batch per user (cancelled ones leave next)
        with self._cv:
            jobs = self.gens.take(room, self._tokens_fit(lambda j: len(j.ids),
                                                         min(self.max_batch_tokens, self.prefill_budget)),
                                  quota=lambda user: self.max_rows_per_user - held[user])
        if not jobs:
            return
        held.update(j.user for j in jobs)
        self.most_rows_one_user = max(self.most_rows_one_user, max(held.values()))
        self._batch(len(jobs))

        def start(js: list[Job]):  # a row's own setup (its seeded generator) fails with its prefill group
            rows = [self._row(j) for j in js]
            return rows, prefill(self.rgm, [j.ids for j in js], [j.row for j in js])

        for group, (rows, (logits, cache, pads)) in self._isolated(jobs, start):
            self.kv.join(cache, pads)
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
            self.rows += rows
            self._stacked = None

    def _row(self, job: Job) -> Row:
        gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
        return Row(job, TextTail(self.decode, job.stop), gen, t_last=job.t)

    def _sample(self) -> None:
        """Pick each row's next token; rows that finished, failed or were abandoned leave the batch."""
        keep = []
        for row, gone in zip(self.rows, hung_up([r.job.conn for r in self.rows])):
            if gone:  # the client closed its connection: cancel now, whenever the HTTP side gets to it
                row.job.future.cancel()
        for b, row in enumerate(self.rows):
            if row.job.future.cancelled():
                self.metrics.dropped()
                self.dropped += 1
                row.job.drop_step = self.steps
                lag = self.steps - row.job.cancel_step if row.job.cancel_step is not None else 0
                self.cancel_lag_max = max(self.cancel_lag_max, lag)
                continue
            try:
                if not self._advance(row, self.logits[b]):
                    keep.append(b)
                    continue
                _resolve(row.job, Generated(row.ids, row.finish, row.tail.text,
                                            row.logprobs if row.job.logprobs is not None else None))
            except Exception as e:
                self.failed_rows += 1
                _resolve(row.job, error=e)
        self._keep(keep)

    def _advance(self, row: Row, logits: torch.Tensor) -> bool:
        """Add one token to `row`; True when the row is finished."""
        job = row.job
        tok = pick(logits, job.temperature, row.gen, job.top_p)
        row.ids.append(tok)
        if job.logprobs is not None:
            row.logprobs.append(step_logprobs(logits, tok, job.logprobs))
            if job.on_logprob is not None:
                job.on_logprob(row.logprobs[-1])
        self.metrics.generated(1)
        now = time.monotonic()
        (self.metrics.first_token if len(row.ids) == 1 else self.metrics.next_token)(now - row.t_last)
        row.t_last = now
        if self.eos_id is not None and tok == self.eos_id and not job.ignore_eos:
            piece, done = row.tail.finish(), True
            row.finish = "stop"
        else:
            piece, done = row.tail.push(tok)
            if done:
                row.finish = "stop"
            elif len(row.ids) >= job.max_tokens:
                piece, done = piece + row.tail.finish(), True
        if piece and job.on_text is not None:
            job.on_text(piece)
        return done

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.rows):
            return
        self.kv.keep(rows)
        self.rows = [self.rows[i] for i in rows]
        self.logits = self.logits[rows] if rows else None
        self._stacked = None

    def _decode(self) -> None:
        if self._stacked is None:
            with torch.inference_mode():  # so that kernels may gather into reused buffers
                self._stacked = self.rgm.batch([r.job.row for r in self.rows])
        tokens = [r.ids[-1] for r in self.rows]
        if self.lean:
            self.logits = self.lean.step(self.kv, tokens, self._stacked)
        else:
            self.logits = decode_step(self.rgm, self.kv, tokens, self._stacked)
        self.steps += 1
        self._batch(len(self.rows))
