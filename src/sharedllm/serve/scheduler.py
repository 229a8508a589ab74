"""The one worker thread that runs every forward pass, fairly between users.

Interface (all the router uses): `Scheduler(score, start, ...)`, `submit(job) -> Future`, `close()`, `stats()`.
`score(jobs) -> results` runs one scoring batch; `start(jobs) -> Decoding` prefills a generation group whose
rows then advance one token per scheduler turn (see compute.Decoding).

Each turn does one unit of work: a scoring batch, the prefill of a new generation group, or one decode step of
every running group, alternating so that neither kind starves the other: a score never waits behind a whole
generation, only behind one decode step. Batches are formed round-robin across users (each user's jobs in
arrival order), so one user's queue cannot crowd another user out of a batch. A user may have at most
`max_queued_per_user` jobs queued or running (`Busy`, HTTP 429, beyond). A job whose future was cancelled (its
client went away) is dropped before its next batch or decode step. A row that fails fails only its own job:
a failing batch is re-run one row at a time to find it.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from ..errors import SharedLLMError


class Busy(SharedLLMError):
    """Too many queued requests of one user (HTTP 429)."""


@dataclass
class Job:
    kind: str  # "score" | "generate"
    ids: list[int]
    gains: object
    max_tokens: int = 0
    temperature: float = 0.0
    seed: int | None = None
    user: str = ""
    top_p: float = 1.0
    future: Future = field(default_factory=Future)
    t: float = field(default_factory=time.monotonic)


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    try:
        job.future.set_exception(error) if error is not None else job.future.set_result(result)
    except InvalidStateError:  # cancelled by its client meanwhile: nobody is waiting
        pass


def round_robin(jobs: list[Job]) -> list[Job]:
    """Jobs reordered user by user in turn (each user's own jobs keep their order; oldest user first)."""
    per_user: dict[str, deque] = {}
    for j in jobs:
        per_user.setdefault(j.user, deque()).append(j)
    out, queues = [], list(per_user.values())
    while queues:
        out += [q.popleft() for q in queues]
        queues = [q for q in queues if q]
    return out


class Scheduler:
    def __init__(self, score, start, window_s: float = 0.01, max_batch: int = 16, max_batch_tokens: int = 16384,
                 max_queued_per_user: int = 32, max_groups: int = 4):
        self._score, self._start = score, start
        self.window_s, self.max_batch, self.max_batch_tokens = window_s, max_batch, max_batch_tokens
        self.max_queued_per_user, self.max_groups = max_queued_per_user, max_groups
        self._q: deque[Job] = deque()
        self._groups: list[tuple[object, list[Job]]] = []  # (Decoding, its jobs, row for row)
        self._cv = threading.Condition()
        self._stop = False
        self._last = "step"
        self.batches = self.rows = self.largest = self.steps = self.cancelled = self.failed_rows = 0
        self._thread = threading.Thread(target=self._loop, name="sharedllm-scheduler", daemon=True)
        self._thread.start()

    # ---- the interface -----------------------------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stop:
                raise SharedLLMError("server is shutting down")
            if self._load(job.user) >= self.max_queued_per_user:
                raise Busy(f"user {job.user!r} already has {self.max_queued_per_user} requests queued or running; "
                           f"retry when some have finished")
            self._q.append(job)
            self._cv.notify()
        return job.future

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for j in list(self._q) + [j for _, jobs in self._groups for j in jobs]:
            _resolve(j, error=SharedLLMError("server is shutting down"))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest, "queued": len(self._q),
                "decode_steps": self.steps, "generating_rows": sum(len(jobs) for _, jobs in self._groups),
                "cancelled_rows": self.cancelled, "failed_rows": self.failed_rows}

    # ---- choosing the next unit of work ------------------------------------------------------------------
    def _load(self, user: str) -> int:
        return sum(j.user == user for j in self._q) + sum(j.user == user for _, js in self._groups for j in js)

    def _ready(self, jobs: list[Job], now: float) -> bool:
        return bool(jobs) and (len(jobs) >= self.max_batch or now >= jobs[0].t + self.window_s
                               or bool(self._groups))

    def _next(self):
        """Under the lock: the next unit of work (a callable), or None to stop. Blocks while there is none."""
        while not self._stop:
            self._drop_cancelled()
            now = time.monotonic()
            scores = [j for j in self._q if j.kind == "score"]
            gens = [j for j in self._q if j.kind == "generate"]
            step_turn = self._groups and self._last != "step"
            if self._ready(scores, now) and not step_turn:
                return self._take(scores, self._run_scores)
            if self._ready(gens, now) and len(self._groups) < self.max_groups and not step_turn:
                return self._take(gens, self._run_start)
            if self._groups:
                return self._run_steps
            waits = [js[0].t + self.window_s - now for js in (scores, gens) if js]
            self._cv.wait(max(min(waits), 0.001) if waits else None)
        return None

    def _take(self, jobs: list[Job], run):
        batch = self._fit(round_robin(jobs))
        for j in batch:
            self._q.remove(j)
        return lambda: run(batch)

    def _fit(self, jobs: list[Job]) -> list[Job]:
        """In the given order, the jobs that fit: at most max_batch rows, rows x padded width <= max_batch_tokens
        (bounds the memory of the logits); the first job always goes."""
        batch, width = [], 0
        for j in jobs:
            w = max(width, len(j.ids) + j.max_tokens)
            if batch and (len(batch) + 1) * w > self.max_batch_tokens:
                continue
            batch.append(j)
            width = w
            if len(batch) == self.max_batch:
                break
        return batch

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._q if j.future.cancelled()]
        for j in gone:
            self._q.remove(j)
        self.cancelled += len(gone)

    def _loop(self) -> None:
        while True:
            with self._cv:
                work = self._next()
            if work is None:
                return
            work()

    # ---- the units of work (worker thread, outside the lock) ---------------------------------------------
    def _count(self, batch: list[Job]) -> None:
        self.batches, self.rows = self.batches + 1, self.rows + len(batch)
        self.largest = max(self.largest, len(batch))

    def _isolated(self, run, batch: list[Job]):
        """run(batch), or, if it raises, run(each row alone): -> [(job, result or None)], failures resolved."""
        try:
            return list(zip(batch, run(batch)))
        except Exception as e:  # one bad row must not fail the others: find it
            if len(batch) == 1:
                return self._fail(batch, e)
            return [pair for j in batch for pair in self._isolated(run, [j])]

    def _fail(self, jobs: list[Job], error: Exception) -> list:
        self.failed_rows += len(jobs)
        for j in jobs:
            _resolve(j, error=error)
        return []

    def _run_scores(self, batch: list[Job]) -> None:
        self._last = "score"
        self._count(batch)
        for j, r in self._isolated(self._score, batch):
            _resolve(j, r)

    def _run_start(self, batch: list[Job]) -> None:
        self._last = "start"
        self._count(batch)
        try:
            new = [(self._start(batch), batch)]
        except Exception as e:  # one bad row must not fail the others: start each row alone
            if len(batch) == 1:
                return self._fail(batch, e)
            new = [(d, [j]) for j, d in self._isolated(lambda jobs: [self._start(jobs)], batch)]
        with self._cv:
            self._groups += new

    def _run_steps(self) -> None:
        """One decode step of every running group; finished rows are answered, cancelled rows dropped."""
        self._last = "step"
        self.steps += 1
        groups = []
        for d, jobs in self._groups:
            try:
                done = d.pick()
                keep = []
                for i, (j, fin) in enumerate(zip(jobs, done)):
                    if j.future.cancelled():
                        self.cancelled += 1
                    elif fin:
                        _resolve(j, d.out[i])
                    else:
                        keep.append(i)
                d.keep(keep)
                if keep:
                    d.forward()
                    groups.append((d, [jobs[i] for i in keep]))
            except Exception as e:  # a decode step failed: only this group's rows fail
                self._fail(jobs, e)
        with self._cv:
            self._groups = groups
