"""sharedllm adapt --manifest users.json --out-dir D --ray: personalise a fleet of users on a Ray cluster.

The driver (this process) reads the manifest, skips every user whose adapter already exists and verifies (in D,
or in the store with --store), and sends the others to the cluster as Ray tasks of U users each (`--fleet-size`,
default 2: one `sharedllm.fleet.train_fleet` pass per task), keeping as many tasks in flight as the cluster has
free slots (CPUs / --task-cpus). Each user's text is read by the driver and travels with its task, and each
adapter comes back as bytes: the workers need sharedllm and the base, no shared filesystem. The driver alone
writes: `D/USER.safetensors` (atomic), then, with --store, the store's own `AdapterStore.put` (atomic, under the
store's lock), so a server reading that store (`sharedllm serve --store DIR`, running or not) serves the user
from that moment on.

Failures: a user whose text cannot be read or is too short fails alone at once (retrying cannot help). A task that
raises or whose worker dies is retried by the driver: a fleet of several users is split into one task per user,
and each user has `--retries` more attempts (default 1: two in all), then is reported failed with its error while
the others go on; the command exits non-zero at the end if any user failed. Resuming is running the same command
again: every adapter that landed is skipped.

Store: a user the store lacks is created with a fresh bearer token, written first (fsynced, mode 0600) to the
tokens file (`--tokens`, default D/store_tokens.jsonl), so no created user's token is ever lost; users that
exist keep theirs. A user whose stored adapter verifies is skipped; one whose stored adapter is for another
base, method or config is left alone and reported failed unless --replace. One `adapt --store` per store at a
time (a lock file `<store>/adapt.lock`), and the driver puts each user at most once per run, so no user ever gets
two trained adapters written into the store.

Hierarchical (`--on-top GROUP`): the driver checks the group file against the base (a LoRA bound to it) before
anything runs, puts it once into Ray's object store for the tasks (each worker merges it into its copy of the base,
once per process), keeps it in D beside the parts and, with --store, in the store's shared/ so the server finds it.

Progress: each event (skipped, stored, done, retry, failed) is a log line on stderr with users done / failed /
in flight and the ETA; `--json-progress [FILE]` also writes one JSON object per event (to stderr or FILE).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from .. import stack, wire
from ..adapters import config_to_json, get_method
from ..atomic import fsync_dir, write_bytes_atomic
from ..errors import SharedLLMError
from ..log import debug, say

FAULT_ENV = "SHAREDLLM_ADAPT_FAULT"  # test hook: "exit-once|USER|MARKER" (the worker os._exit()s after training
# USER's task, once) or "raise|USER" (every task holding USER raises); passed in the task spec, not the env
SERVER_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # serve/app.py's USER_NAME: what POST /v1/users
# accepts; a store user must be one the server can authenticate (tests check the two agree)
TOKENS_FILE = "store_tokens.jsonl"
_WORKER: dict = {}  # in a worker process: (base, device, dtype, method) -> Base, loaded once per process


# ---- in a Ray worker ----------------------------------------------------------------------------------------

def train_users(spec: dict, users: list[dict], group: bytes | None = None) -> dict:
    """Train `users` ([{"user", "source", "text", "lr"}]) in one fleet pass (on top of the `group` adapter file when
    the spec has "on_top"); return each user's adapter bytes and held-out ppl, or the error of a user whose text is
    unusable (the others still train)."""
    import torch

    from ..fleet import train_fleet
    from ..personalise import evaluate_on, save_adapted
    from ..train import TrainConfig, autocast

    torch.set_num_threads(spec["threads"])
    start, cpu = time.perf_counter(), time.process_time()
    base = _worker_base(spec, group)
    info = _on_top_info(spec, base)
    cfg = TrainConfig(**{**spec["cfg"], "betas": tuple(spec["cfg"]["betas"])})
    out = {"fingerprint": base.fingerprint, "pid": os.getpid(), "users": {}}
    data, cfgs = {}, {}
    for u in users:
        try:
            data[u["user"]] = _user_data(u["text"], u["source"], base.tokenizer).check(cfg.seq, spec["window"])
            cfgs[u["user"]] = replace(cfg, lr=u["lr"]) if u.get("lr") is not None else cfg
        except SharedLLMError as e:
            out["users"][u["user"]] = {"error": str(e), "final": True}
    _fault(spec.get("fault"), [u["user"] for u in users], "raise")
    if data:
        adapted = train_fleet(base, {n: d.train.to(base.device) for n, d in data.items()}, cfgs, dtype=spec["dtype"],
                              method=spec["method"], method_config=spec["method_config"],
                              label=f"fleet of {len(data)}")
        train_s = time.perf_counter() - start
        cap = spec["eval_tokens"] or None
        with tempfile.TemporaryDirectory() as tmp, autocast(spec["dtype"], base.device):
            for name, d in data.items():
                before = evaluate_on(base.model, base, d.heldout, spec["window"], cap)
                after = evaluate_on(adapted[name].model, base, d.heldout, spec["window"], cap)
                path = save_adapted(adapted[name], Path(tmp) / f"{name}.safetensors", base,
                                    info={"user": name, "user_text": Path(d.source).name, **info})
                summary = adapted[name].result.summary()
                out["users"][name] = {
                    "bytes": path.read_bytes(), "lr": adapted[name].meta["train"]["lr"],
                    "ppl_before": before["ppl"], "ppl_after": after["ppl"], "bpb_before": before["bits_per_byte"],
                    "bpb_after": after["bits_per_byte"], "eval_tokens": after["tokens"],
                    "params": adapted[name].n_params, "steps": adapted[name].result.steps,
                    "loss_first": summary["loss_first"], "loss_last": summary["loss_last"]}
        out["train_s"], out["fleet"] = round(train_s, 3), len(data)
    out["wall_s"], out["cpu_s"] = round(time.perf_counter() - start, 3), round(time.process_time() - cpu, 3)
    _fault(spec.get("fault"), [u["user"] for u in users], "exit-once")
    return out


def base_fingerprint(spec: dict, group: bytes | None = None) -> str:
    """In a Ray worker: the fingerprint of the base the workers train on (loaded once per worker process)."""
    return _worker_base(spec, group).fingerprint


def _worker_base(spec: dict, group: bytes | None = None):
    """The spec's base (on top of its group adapter, merged into a copy, with "on_top"), once per worker process."""
    from .args import load_for_training

    on_top = spec.get("on_top")
    key = (spec["base"], spec["device"], spec["dtype"], spec["method"], on_top and on_top["sha256"])
    if key not in _WORKER:
        _WORKER.clear()  # one base per worker process
        base = load_for_training(SimpleNamespace(base=spec["base"], device=spec["device"], dtype=spec["dtype"],
                                                 method=spec["method"]))
        if on_top:
            from ..personalise import stacked_base

            base = stacked_base(base, group, on_top["file"])
        _WORKER[key] = base
    return _WORKER[key]


def _on_top_info(spec: dict, base) -> dict:
    """The `on_top` metadata of the parts a worker trains on a stacked base ({} on the base itself)."""
    return stack.on_top_meta(Path(spec["on_top"]["file"]), base) if spec.get("on_top") else {}


def _user_data(text: str, source: str, tokenizer):
    """data.load_user on a text the driver read (the same split by position, the same tokens)."""
    import torch

    from ..data import UserData, split_by_position

    train, heldout = split_by_position(text)
    enc = lambda s: torch.tensor(tokenizer.encode(s), dtype=torch.long)  # noqa: E731
    return UserData(source=source, train=enc(train), heldout=enc(heldout))


def _fault(spec: str | None, users: list[str], when: str) -> None:
    parts = (spec or "").split("|")
    if parts[0] != when or len(parts) < 2 or parts[1] not in users:
        return
    if when == "raise":
        raise RuntimeError(f"injected failure in the task of user {parts[1]}")
    marker = Path(parts[2])
    if not marker.exists():
        marker.write_text(f"{os.getpid()} {time.time()}\n")
        os._exit(1)  # as a killed worker: no exception, no result


# ---- the driver -------------------------------------------------------------------------------------------

def worker_env(threads: int) -> dict:
    """A task's environment: the driver's sharedllm importable (first on PYTHONPATH; on a cluster, where that path
    does not exist, each node's installed one), its SHAREDLLM_* settings (cache folder) but the fault hook (sent in
    the task spec, so that a test's hook does not start new worker processes), `threads` torch threads."""
    import sharedllm

    env = {k: v for k, v in os.environ.items() if k.startswith("SHAREDLLM_") and k != FAULT_ENV}
    path, package = os.environ.get("PYTHONPATH"), Path(sharedllm.__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(package) + (os.pathsep + path if path else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class _Task:
    users: list[str]
    attempt: int = 1


@dataclass
class _Outcome:
    status: str  # trained | stored (from D into the store) | skipped | failed
    row: dict = field(default_factory=dict)


def run_ray(args, entries: dict) -> dict:
    """The command: `entries` {user: {"text": PATH, "lr"?: X}} from the manifest / --text."""
    from ..bets import ray_units
    from .args import method_config, read_group, train_config

    cfg, config = train_config(args), method_config(args)
    if args.store is not None:
        bad = [u for u in entries if not SERVER_USER_NAME.fullmatch(u)]
        if bad:
            raise SharedLLMError(f"user name {bad[0]!r} is not one the server accepts (1-64 letters, digits, _ . @ -, "
                                 f"starting with a letter or digit); rename it in the manifest to use --store")
    spec = {"base": args.base, "device": args.device, "dtype": args.dtype, "method": args.method,
            "method_config": config_to_json(config), "cfg": cfg.to_json(), "window": args.window,
            "eval_tokens": args.eval_tokens, "threads": args.task_cpus, "fault": os.environ.get(FAULT_ENV)}
    group = read_group(args.on_top) if args.on_top else None
    if group is not None:
        spec["on_top"] = {"file": Path(args.on_top).name, "sha256": stack.sha256_of(group)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as exits:
        exits.enter_context(_exclusive(out_dir / ".adapt.lock", f"--out-dir {out_dir}"))
        store = _open_store(args, exits)

        def connect():
            ray = ray_units.ray_module()
            address = args.ray_address if args.ray_address else None
            if ray_units.start(None if address in (None, "local") else address, num_cpus=args.ray_workers):
                exits.callback(ray.shutdown)
            return ray

        return _Run(args, entries, spec, config, store, connect, ray_units.one_line, group).go()


@contextlib.contextmanager
def _exclusive(path: Path, what: str):
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SharedLLMError(f"another `sharedllm adapt --ray` is writing {what} ({path} is locked); wait "
                                 f"for it to end") from None
        yield
    finally:
        os.close(fd)


def _open_store(args, exits):
    if args.store is None:
        return None
    from ..store import AdapterStore
    from .serve import store_dir

    root = store_dir(SimpleNamespace(store=args.store or None, base=args.base))  # --store alone: serve's default
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    exits.enter_context(_exclusive(root / "adapt.lock", f"the store {root}"))
    store = AdapterStore(root)
    exits.callback(store.close)
    return store


class _Run:
    def __init__(self, args, entries, spec, config, store, connect, one_line, group: bytes | None = None):
        self.args, self.entries, self.spec, self.config, self.store = args, entries, spec, config, store
        self.connect, self.ray, self.one_line = connect, None, one_line
        self.group, self._group_ref = group, None  # --on-top: the group file, sent to the object store once
        self.out_dir = Path(args.out_dir)
        self.outcomes: dict[str, _Outcome] = {}
        self.tokens = _Tokens(Path(args.tokens) if args.tokens else self.out_dir / TOKENS_FILE) if store else None
        self.progress = _Progress(len(entries), args.json_progress)
        self.fingerprint = None
        self.puts = 0  # store writes this run (each user at most once)

    # ---- plan --------------------------------------------------------------------------------------------
    def go(self) -> dict:
        """Plan (Ray is started only when the base's fingerprint needs a worker, or a user needs training), then
        dispatch."""
        start = time.perf_counter()
        say(f"{len(self.entries)} users, {self.args.method} on {self.args.base}: writing {self.out_dir}"
            + (f" and the store {self.store.root}" if self.store else ""))
        self.fingerprint = self._fingerprint()
        if self.group is not None:
            self._keep_group()
        todo = self._plan()
        resources = self._ray().cluster_resources() if todo else {}
        if todo:
            say(f"Ray cluster with {resources.get('CPU', 0):.0f} CPUs: tasks of up to {self.args.fleet_size} users, "
                f"{self.args.task_cpus} CPU each")
        self.progress.event("start", to_train=len(todo), skipped=len(self.entries) - len(todo),
                            cpus=resources.get("CPU"), fleet_size=self.args.fleet_size)
        if todo:
            self._dispatch(todo)
        wall = time.perf_counter() - start
        return self._result(wall)

    def _ray(self):
        if self.ray is None:
            self.ray = self.connect()
        return self.ray

    def _fingerprint(self) -> str:
        """The fingerprint the users' adapters are bound to, without loading the base here: the base's, recorded
        for a named base converted on this machine or the tiny test base's own (with --on-top: checked against the
        group file and stacked on it), else from a worker (which keeps the base it loaded for the tasks)."""
        from ..base import peek

        known = peek(self.args.base)
        if known or self.args.base == "tiny":
            from ..base import load_base

            fingerprint = known[1] if known else load_base("tiny").fingerprint
            if self.group is None:
                return fingerprint
            stack.check_group(self.group, fingerprint, f"--on-top {self.args.on_top}")
            return stack.stacked_fingerprint(fingerprint, self.spec["on_top"]["sha256"])
        ref = self._ray().remote(base_fingerprint).options(**self._task_options()).remote(self.spec,
                                                                                            self._group())
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            raise SharedLLMError(f"a Ray worker could not load base {self.args.base!r}: {self.one_line(e)}") from None

    def _verify(self, data: bytes, source: str) -> dict:
        """An adapter's metadata if it parses, is bound to this base and is this method with this config."""
        _, meta = wire.parse_file(data, source)
        wire.check_binding(meta, self.fingerprint, source)
        if meta.get("method") != self.args.method:
            raise SharedLLMError(f"{source}: method {meta.get('method')!r}, not {self.args.method!r}")
        if get_method(meta["method"], meta.get("method_config")).config != self.config:
            raise SharedLLMError(f"{source}: {meta['method']} config {meta.get('method_config')}, not "
                                 f"{config_to_json(self.config)}")
        return meta

    def _local(self, user: str) -> tuple[bytes, dict] | None:
        path = self._path(user)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            return data, self._verify(data, str(path))
        except SharedLLMError as e:
            say(f"{user}: {e}; training it again")
            return None

    def _plan(self) -> list[str]:
        """Users to train, in the manifest's order; settles the others (skipped, stored from D, conflicts)."""
        todo = []
        for user in self.entries:
            if self.store is None:
                if self._local(user):
                    self._settle(user, "skipped", where=str(self._path(user)))
                else:
                    todo.append(user)
                continue
            rec = self.store.get(user)
            if rec is not None:
                try:
                    self._verify(self.store.read(rec.sha256), f"the stored adapter of {user!r}")
                    self._settle(user, "skipped", where="store", sha256=rec.sha256)
                    continue
                except (SharedLLMError, OSError) as e:
                    if not self.args.replace:
                        self._settle(user, "failed", error=f"has another adapter in the store ({e}); give "
                                                           f"--replace to train and replace it", attempts=0)
                        continue
            local = self._local(user)  # read only when the store does not settle the user
            if local:
                self._store(user, *local)
                self._settle(user, "stored", where=str(self._path(user)))
            else:
                todo.append(user)
        return todo

    # ---- dispatch ----------------------------------------------------------------------------------------
    def _task_options(self) -> dict:
        gpu = self.args.device.startswith("cuda")
        return {"num_cpus": self.args.task_cpus, "num_gpus": 1 if gpu else 0, "max_retries": 0,
                "runtime_env": {"env_vars": worker_env(self.args.task_cpus)}}

    def _slots(self) -> int:
        res = self.ray.cluster_resources()
        if self.args.device.startswith("cuda"):
            return max(1, int(res.get("GPU", 1)))
        return max(1, int(res.get("CPU", 1) // self.args.task_cpus))

    def _dispatch(self, todo: list[str]) -> None:
        task = self.ray.remote(train_users)
        options = self._task_options()
        pending, retries = deque(todo), deque()  # fresh users; single-user tasks to try again (first)
        flight: dict = {}  # ref -> _Task
        self.progress.clock()
        try:
            self._loop(task, options, pending, retries, flight)
        except BaseException:  # Ctrl-C, or the driver's own failure: what landed is kept, the rest is resumed later
            for ref in flight:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref, force=True)
            raise

    def _loop(self, task, options, pending: deque, retries: deque, flight: dict) -> None:
        while pending or retries or flight:
            slots = self._slots()
            while (pending or retries) and len(flight) < slots:
                if retries:
                    job = retries.popleft()
                else:  # U users, fewer when the cluster would otherwise sit idle (small remainders)
                    size = max(1, min(self.args.fleet_size, math.ceil(len(pending) / (slots - len(flight)))))
                    job = _Task([pending.popleft() for _ in range(min(size, len(pending)))])
                users = self._payload(job.users)
                if not users:
                    continue
                job.users = [u["user"] for u in users]
                flight[task.options(**options).remote(self.spec, users, self._group())] = job
                self.progress.in_flight = sum(len(j.users) for j in flight.values())
            if not flight:
                continue
            ready, _ = self.ray.wait(list(flight), num_returns=1)
            job = flight.pop(ready[0])
            self.progress.in_flight = sum(len(j.users) for j in flight.values())
            try:
                self._landed(job, self.ray.get(ready[0]))
            except self.ray.exceptions.RayError as e:
                self._task_failed(job, self.one_line(e), retries)
            self.progress.in_flight = sum(len(j.users) for j in flight.values())

    def _payload(self, users: list[str]) -> list[dict]:
        """Each user's text, read here (a user whose text cannot be read fails now, alone)."""
        from ..data import read_user_text

        out = []
        for user in users:
            e = self.entries[user]
            try:
                text = read_user_text(e["text"])
            except (SharedLLMError, OSError) as err:
                self._settle(user, "failed", error=str(err), attempts=0)
                continue
            out.append({"user": user, "source": str(e["text"]), "text": text, "lr": e.get("lr")})
        return out

    def _task_failed(self, job: _Task, error: str, retries: deque) -> None:
        if len(job.users) > 1 or job.attempt < self.args.retries + 1:
            for user in job.users:  # a fleet that failed goes on as one task per user: a bad user fails alone
                if job.attempt < self.args.retries + 1:
                    retries.append(_Task([user], job.attempt + 1))
                    self.progress.event("retry", user, attempt=job.attempt, error=error, fleet=len(job.users))
                else:
                    self._settle(user, "failed", error=error, attempts=job.attempt)
            return
        self._settle(job.users[0], "failed", error=error, attempts=job.attempt)

    def _landed(self, job: _Task, result: dict) -> None:
        if result["fingerprint"] != self.fingerprint:  # a node with another base: nothing it made is usable
            error = (f"the worker's base {result['fingerprint'][:16]}... is not this run's "
                     f"{self.fingerprint[:16]}... (every node needs the same base)")
            for user in job.users:
                self._settle(user, "failed", error=error, attempts=job.attempt)
            return
        for user in job.users:
            got = result["users"].get(user)
            if got is None:
                self._settle(user, "failed", error="the task returned nothing for this user", attempts=job.attempt)
            elif "error" in got:  # its text: no attempt would do better
                self._settle(user, "failed", error=got["error"], attempts=job.attempt, retried=False)
            else:
                self._keep(user, got, job, result)

    def _keep(self, user: str, got: dict, job: _Task, result: dict) -> None:
        data = got.pop("bytes")
        try:
            meta = self._verify(data, f"the adapter trained for {user!r}")
        except SharedLLMError as e:
            self._settle(user, "failed", error=str(e), attempts=job.attempt)
            return
        path = write_bytes_atomic(self._path(user), data)
        if self.store is not None:
            self._store(user, data, meta)
        self._settle(user, "trained", out=str(path), bytes=len(data), attempts=job.attempt, fleet=result["fleet"],
                     task_wall_s=result["wall_s"], task_cpu_s=result["cpu_s"], **got)

    def _group(self):
        """--on-top: the group file in Ray's object store (put once, resolved in each task), else None."""
        if self.group is not None and self._group_ref is None:
            self._group_ref = self._ray().put(self.group)
        return self._group_ref

    # ---- writing ------------------------------------------------------------------------------------------
    def _keep_group(self) -> None:
        """The group file beside the users' parts, and in the store's shared/ (where a server finds it)."""
        stack.keep_beside(self.group, self.spec["on_top"]["file"], self.out_dir)
        if self.store is not None:
            self.store.put_shared(self.spec["on_top"]["sha256"], self.group)

    def _path(self, user: str) -> Path:
        return self.out_dir / f"{user}.safetensors"

    def _store(self, user: str, data: bytes, meta: dict) -> None:
        if not self.store.user_exists(user):
            self.tokens.create(self.store, user)
        self.store.put(user, data, meta)
        self.puts += 1

    def _settle(self, user: str, status: str, **row) -> None:
        self.outcomes[user] = _Outcome(status, {"user": user, "status": status, **row})
        shown = {k: v for k, v in row.items() if k in ("error", "attempts", "retried", "where", "out", "ppl_before",
                                                        "ppl_after", "fleet", "sha256")}
        self.progress.event(status, user, **shown)

    def _result(self, wall: float) -> dict:
        rows = [self.outcomes[u].row for u in self.entries if u in self.outcomes]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("trained", "stored", "skipped", "failed")}
        trained = counts["trained"]
        result = {"ok": counts["failed"] == 0, "method": self.args.method, "base": self.args.base,
                  "base_fingerprint": self.fingerprint, "out_dir": str(self.out_dir),
                  "store": str(self.store.root) if self.store else None, "users": rows, **counts,
                  "store_writes": self.puts, "wall_s": round(wall, 2),
                  "users_per_hour": round(3600 * trained / wall, 1) if trained and wall > 0 else None,
                  "fleet_size": self.args.fleet_size, "task_cpus": self.args.task_cpus, "on_top": self.spec.get("on_top"),
                  "failures": {r["user"]: r["error"] for r in rows if r["status"] == "failed"}}
        if self.tokens is not None:
            result["tokens_file"] = str(self.tokens.path) if self.tokens.created else None
            result["users_created"] = self.tokens.created
        self.progress.event("end", **{k: result[k] for k in ("trained", "stored", "skipped", "failed", "wall_s")})
        self.progress.close()
        return result


class _Tokens:
    """The bearer tokens of the users this command creates in a store, one JSON line each (mode 0600), written and
    fsynced before the user exists (a token is never lost); a user whose line was written by a run that stopped
    before creating them gets that same token."""

    def __init__(self, path: Path):
        self.path, self.created = path, 0
        self.known = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    d = json.loads(line)
                    self.known[d["user"]] = d["token"]

    def create(self, store, user: str) -> None:
        from ..store import new_token

        token = self.known.get(user)
        if token is None:
            token = new_token()
            self._append({"user": user, "token": token, "created": round(time.time(), 3)})
            self.known[user] = token
        try:
            store.create_user(user, token)
        except SharedLLMError:  # created meanwhile (an admin's POST /v1/users): theirs stands, ours never worked
            self._append({"user": user, "token": None, "note": "the user existed: this token was never valid"})
            return
        self.created += 1

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if fresh:
            os.chmod(self.path, 0o600)
            fsync_dir(self.path.parent)


class _Progress:
    """Users done / failed / in flight and the ETA, as log lines and (--json-progress) JSON lines."""

    def __init__(self, total: int, json_to: str | None):
        self.total, self.counts, self.in_flight, self.processed = total, {}, 0, 0
        self.clocked = False
        self.t0 = self.started = time.perf_counter()
        self._file = None
        if json_to is not None:
            self._file = sys.stderr if json_to == "-" else open(json_to, "a", encoding="utf-8")  # noqa: SIM115

    def clock(self) -> None:
        """Training starts now: the ETA counts from here."""
        self.started, self.clocked = time.perf_counter(), True

    def eta(self) -> float | None:
        """Users left x the time per user settled since training started (the cluster's rate, all workers)."""
        done = self.processed
        left = self.total - sum(self.counts.get(k, 0) for k in ("trained", "stored", "skipped", "failed"))
        if left <= 0:
            return 0.0
        return left * (time.perf_counter() - self.started) / done if done else None

    def event(self, kind: str, user: str | None = None, **info) -> None:
        if kind in ("trained", "stored", "skipped", "failed"):
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.processed += self.clocked
        done = sum(self.counts.get(k, 0) for k in ("trained", "stored", "skipped"))
        eta = self.eta()
        state = {"done": done, "failed": self.counts.get("failed", 0), "total": self.total,
                 "in_flight": self.in_flight, "eta_s": None if eta is None else round(eta, 1)}
        (debug if kind == "skipped" else say)(self._line(kind, user, info, state))  # a rerun of 215,000: one line
        if self._file is not None:
            record = {"event": kind, **({"user": user} if user else {}),
                      "t": round(time.perf_counter() - self.t0, 3), **state, **info}
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def _line(self, kind: str, user, info: dict, state: dict) -> str:
        eta = state["eta_s"]
        tail = (f"[{state['done']}/{state['total']} done, {state['failed']} failed, {state['in_flight']} in flight"
                + (f", ETA {_duration(eta)}" if eta is not None and kind != "end" else "") + "]")
        if kind == "trained":
            what = (f"trained (held-out ppl {info['ppl_before']:.3f} -> {info['ppl_after']:.3f}; "
                    f"attempt {info['attempts']}, fleet of {info['fleet']})")
        elif kind == "failed":
            when = ("" if not info.get("attempts") or info.get("retried") is False
                    else f" after {info['attempts']} attempt{'s' if info['attempts'] > 1 else ''}")
            what = f"FAILED{when}: {info['error']}"
        elif kind == "retry":
            what = f"attempt {info['attempt']} failed ({info['error']}); trying again alone"
        elif kind == "skipped":
            what = f"already done ({info['where']})"
        elif kind == "stored":
            what = f"put into the store from {info['where']} (trained earlier)"
        elif kind == "start":
            return (f"{info['to_train']} users to train, {info['skipped']} settled already "
                    f"({self.counts.get('skipped', 0)} done before, {self.counts.get('stored', 0)} put into the store "
                    f"from files, {self.counts.get('failed', 0)} failed) {tail}")
        else:
            return f"finished: {info['trained']} trained, {info['stored']} stored from files, {info['skipped']} " \
                   f"skipped, {info['failed']} failed in {_duration(info['wall_s'])}"
        return f"{user}: {what} {tail}"

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stderr:
            self._file.close()


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def render_ray(r: dict) -> str:
    lines = [f"{r['method']} on {r['base']}: {r['trained']} trained, {r['stored']} put into the store from "
             f"{r['out_dir']}, {r['skipped']} already done, {r['failed']} FAILED; {r['wall_s']:.1f} s"
             + (f" ({r['users_per_hour']:.0f} users/hour trained)" if r["users_per_hour"] else "")]
    if r.get("on_top"):
        lines.append(f"on top of group {r['on_top']['file']} (sha256 {r['on_top']['sha256'][:16]}...): kept in "
                     f"{r['out_dir']}" + (" and in the store's shared/" if r.get("store") else ""))
    if r.get("store"):
        lines.append(f"store {r['store']}: {r['store_writes']} adapters written"
                     + (f"; {r['users_created']} users created, their tokens in {r['tokens_file']} (mode 0600)"
                        if r.get("users_created") else ""))
    trained = [u for u in r["users"] if u["status"] == "trained"]
    if trained:
        lines.append(f"{'user':24s} {'held-out ppl':>19s} {'change':>8s}  adapter")
        for u in trained:
            change = 100 * (u["ppl_after"] / u["ppl_before"] - 1)
            lines.append(f"{u['user']:24s} {u['ppl_before']:8.2f} -> {u['ppl_after']:7.2f} {change:+7.1f} %  {u['out']}")
    for user, error in r["failures"].items():
        lines.append(f"FAILED {user}: {error}")
    if r["failures"]:
        lines.append(f"{r['failed']} of {len(r['users'])} users failed; run the same command again to retry them "
                     "(the others are skipped)")
    return "\n".join(lines)
