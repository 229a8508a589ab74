"""A bet's units as Ray tasks (`--ray`: a local instance sized to this machine; `--ray-address auto|ray://...`:
an existing cluster). Each unit asks for one CPU (one GPU with --device cuda); a worker process loads the base
once and computes the units it is sent; the driver alone writes the checkpoint and the result.

A unit whose task raises, or whose worker dies, is retried (`--ray-retries`, default 2) and then recorded as failed
with its error. On a cluster, every node needs sharedllm and the bets dir at the same paths and `--out` on a shared filesystem
(the adapters are written there; the cells come back to the driver either way).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import sharedllm
from sharedllm.log import say
from sharedllm.errors import SharedLLMError

from .catalogue import ENV, current

RETRIES = 2
FULL_FT_CPUS = 2  # a full fine-tune unit ("full/...") asks for 2 CPUs: its memory (weights, gradients, AdamW moments
# ~16 bytes/param) is what limits a small machine, and two at once would not fit 24 GiB at 0.5B
START_TRIES = 3
LONG_FIRST = ("quantize/",)  # units known to take hours (quantising a 0.5B base: 1-2 h on a CPU) are sent ahead of the
# bet's order, so that they run beside the short ones instead of after them (the ternary units wait on them)
FAULT_ENV = "SHAREDLLM_UNIT_FAULT"  # fault injection for tests: "exit-once|KEY|MARKER_FILE" or "raise|KEY"
_WORKER: dict = {}  # in a worker process: (bet, options) -> Context, so the base is loaded once per process


def ray_module():
    try:
        import ray
    except ImportError:
        raise SharedLLMError("--ray needs Ray: pip install -e \".[ray]\" (ray==2.60.0)") from None
    return ray


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start(address: str | None, num_cpus: int | None = None) -> bool:
    """Start a local Ray instance (address None; one worker slot per core) or join a cluster; False if this process
    is already connected to one (then that one is used and left running)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    if address is None:  # Ray starts its workers at nice 15: on a shared machine they would starve behind
        os.environ.setdefault("RAY_worker_niceness", "0")  # everything else (the raylet reads this at start)
    kw = ({"address": "local", "num_cpus": num_cpus or cpus(), "include_dashboard": False,
           "object_store_memory": 100 << 20} if address is None else {"address": address})
    for _ in range(START_TRIES):  # Ray gives its raylet a fixed 30 s to come up: on a busy machine, try again
        before = _children()
        try:
            ray.init(log_to_driver=True, **kw)
            return True
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a startup timeout
            ray.shutdown()
            _end_new_children(before)  # a failed start leaves its gcs_server / raylet running otherwise
            error = one_line(e)
    where = "start a local Ray instance" if address is None else f"join the Ray cluster at {address}"
    raise SharedLLMError(f"could not {where} ({START_TRIES} tries; {error}); run without --ray, or try again")


def _children() -> set:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _end_new_children(before: set) -> None:
    """Kill what a failed start left (twice: the raylet may still be spawning its agents during the first pass)."""
    import psutil

    for _ in range(2):
        for proc in psutil.Process().children(recursive=True):
            if proc.pid not in before:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        time.sleep(1)


def worker_env(device: str) -> dict:
    """What a unit's worker process needs: the driver's sharedllm importable, its bets dir, one thread per CPU
    asked, the SHAREDLLM_* settings (cache folder, fault hooks) of the driver."""
    env = {k: v for k, v in os.environ.items() if k.startswith("SHAREDLLM_")}
    env[ENV] = str(current().path)
    path, package = os.environ.get("PYTHONPATH"), Path(sharedllm.__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(package) + (os.pathsep + path if path else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def dispatch(bet, opts, pending, checkpoint) -> dict:
    """Run the bet's pending units as Ray tasks, checkpointing each unit's output as it arrives. `pending()` lists
    the units not checkpointed yet, in the bet's order; the driver keeps only as many in flight as the cluster has
    CPUs (GPUs with --device cuda), takes the first ones not yet sent (a quantise unit, hours long, first), and asks
    `pending()` again as each unit lands, so units that wait on others are sent as soon as those are done, ahead of
    later ones. Each unit is sent once (Ray retries it). Returns {key: error} of the units that failed."""
    ray = ray_module()
    started = start(opts.ray if opts.ray != "local" else None)
    try:
        gpu = opts.device.startswith("cuda")
        task = ray.remote(compute_unit)
        common = {"num_gpus": 1 if gpu else 0, "max_retries": opts.ray_retries, "retry_exceptions": True,
                  "runtime_env": {"env_vars": worker_env(opts.device)}}
        plain = json.dumps(_plain(opts))
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1)) or 1
        say(f"bet {bet.name}: units go to Ray, {slots} at a time ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
        flight = _Flight(slots, gpu)

        def feed():
            done = None  # what the driver has finished (units that depend on it need it), put once per feed
            for key in long_first(pending()):
                if key in flight.sent:
                    continue
                if not flight.fits(key):
                    break  # keep the bet's order: the next unit waits for room
                done = ray.put(checkpoint.units()) if done is None else done
                flight.send(key, task.options(num_cpus=flight.cpus(key), **common).remote(
                    bet.id, plain, key, done, flight.cpus(key)))

        feed()
        return _gather(ray, flight, checkpoint, feed)
    finally:
        if started:
            ray.shutdown()


def long_first(keys: list) -> list:
    """`keys` in the bet's order, except that the LONG_FIRST units come first."""
    return [k for k in keys if k.startswith(LONG_FIRST)] + [k for k in keys if not k.startswith(LONG_FIRST)]


class _Flight:
    """The units in flight on Ray and the CPUs they hold (a full fine-tune asks for 2: its memory)."""

    def __init__(self, slots: int, gpu: bool):
        self.slots, self.gpu, self.busy = slots, gpu, 0
        self.refs: dict = {}  # ref -> key
        self.sent: set = set()

    def cpus(self, key: str) -> int:
        return min(FULL_FT_CPUS, self.slots) if key.startswith("full/") and not self.gpu else 1

    def fits(self, key: str) -> bool:
        return not self.refs or self.busy + self.cpus(key) <= self.slots

    def send(self, key: str, ref) -> None:
        self.refs[ref], self.busy = key, self.busy + self.cpus(key)
        self.sent.add(key)

    def land(self, ref) -> str:
        key = self.refs.pop(ref)
        self.busy -= self.cpus(key)
        return key


def _gather(ray, flight: _Flight, checkpoint, feed) -> dict:
    failed, landed = {}, 0
    while flight.refs:
        ready, _ = ray.wait(list(flight.refs), num_returns=1)
        key = flight.land(ready[0])
        landed += 1
        try:
            checkpoint.put(key, ray.get(ready[0]))
            say(f"{key}: done ({landed} landed, {len(flight.refs)} in flight)")
        except ray.exceptions.RayError as e:
            failed[key] = one_line(e)
            checkpoint.fail(key, failed[key])
            say(f"{key}: FAILED after retries: {failed[key]}")
        feed()
    return failed


def one_line(e: BaseException) -> str:
    """The gist of a Ray error: the unit's own exception if there is one, else Ray's first line."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _plain(opts) -> dict:
    d = asdict(replace(opts, ray=None, force=False))
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _options(plain: str):
    from .spec import Options

    d = json.loads(plain)
    for k in ("corpora", "out", "results"):
        d[k] = Path(d[k]) if d[k] is not None else None
    return Options(**d)


# ---- in a Ray worker ----

def compute_unit(bet_id: str, plain_opts: str, key: str, done: dict | None = None, threads: int = 1) -> dict:
    """Compute one unit of a bet: run the bet's run() with `key` as the target (every other unit is skipped;
    the units in `done`, finished by the driver, give their cells to the units that depend on them)."""
    import torch

    from .context import NoCheckpoint, UnitDone

    torch.set_num_threads(threads)  # one per CPU the task asked for
    ctx = _context(bet_id, plain_opts)
    ctx.checkpoint = NoCheckpoint(done)
    ctx.users_used, ctx.seeds_used, ctx.extras, ctx.target = [], set(), {}, key
    _fault(key)
    try:
        ctx.bet.run(ctx)
    except UnitDone as done:
        return done.args[1]
    finally:
        ctx.release()
    raise SharedLLMError(f"bet {ctx.bet.name}: run() never reached unit {key!r} (its units changed?)")


def _context(bet_id: str, plain_opts: str):
    from .context import Context, NoCheckpoint
    from .spec import get_bet

    if (bet_id, plain_opts) not in _WORKER:
        _WORKER.clear()  # one bet at a time per worker: do not hold two bases
        bet = get_bet(bet_id)
        _WORKER[bet_id, plain_opts] = Context(bet, _options(plain_opts), checkpoint=NoCheckpoint())
    return _WORKER[bet_id, plain_opts]


def _fault(key: str) -> None:
    """Test hook: die (os._exit, as a killed worker would) the first time `key` runs, or always raise."""
    spec = os.environ.get(FAULT_ENV, "").split("|")
    if spec[0] == "exit-once" and spec[1] == key and not Path(spec[2]).exists():
        Path(spec[2]).write_text(str(time.time()))
        os._exit(1)
    if spec[0] == "raise" and spec[1] == key:
        raise RuntimeError(f"injected failure in unit {key}")
