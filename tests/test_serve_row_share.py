"""Fairness in rows (issue 34 item 4): one user's generations hold at most `max_rows_per_user` of the decode batch,
so another user's short completion is admitted at the next admission even while one user has 16 long generations
in; a lone user is held to the cap too (the default), or fills the batch when the cap is the batch. Norm and LoRA
rows alike. Asserted on the engine's own decode-step count, never on time."""
import pytest

from sharedllm.serve.router import Router
from sharedllm.serve.scheduler import Engine, FairQueue, Job
from sharedllm.store import AdapterStore

from .serve_kit import adapter_bytes

PROMPT = [256, *b"the cat sat on the mat"]
LONG, SHORT = 60, 5


class StepHook:
    """Engine metrics that call `fn(tokens generated so far)` on the engine thread after each generated token."""

    def __init__(self, fn=lambda n: None):
        self.fn, self.n = fn, 0

    def generated(self, n):
        self.n += n
        self.fn(self.n)

    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.fixture(scope="module")
def rows(tiny, tmp_path_factory):
    """(norm row, LoRA row) of two users, packed by the server's own upload path."""
    d = tmp_path_factory.mktemp("rows")
    router = Router(tiny, AdapterStore(d / "store"), window_s=0)
    out = tuple(router.validate(adapter_bytes(tiny, seed, d, method=m), m)[1]
                for seed, m in ((1, "norm"), (2, "lora")))
    router.close()
    router.store.close()
    return out


def engine(tiny, hook, **kw):
    from sharedllm.adapters.rows import RowModel

    return Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=16, metrics=hook, **kw)


def flood_then_one(tiny, flood_row, other_row, **kw) -> dict:
    """User ann submits 16 generations of LONG tokens at once; after three decode steps of them, bob submits one of
    SHORT tokens (from the engine thread, so the step it arrives at is exact). Returns what the engine did."""
    seen: dict = {}
    hook = StepHook()
    e = engine(tiny, hook, **kw)
    bob = Job("generate", PROMPT, other_row, "bob", SHORT, 0.0)

    def at(n):
        if "submit_step" not in seen and e.steps == 3:
            seen["submit_step"] = e.steps
            seen["ann_rows"] = sum(r.job.user == "ann" for r in e.rows)
            seen["ann_waiting"] = len(e.gens)
            e.submit(bob)

    hook.fn = at
    bob.future.add_done_callback(lambda f: seen.setdefault("done_step", e.steps))  # runs on the engine thread
    try:
        flood = [Job("generate", PROMPT, flood_row, "ann", LONG, 0.0) for _ in range(16)]
        with e._cv:  # all queued before the engine looks
            for j in flood:
                e.submit(j)
        seen["bob_ids"] = bob.future.result(timeout=600).ids
        seen["flood"] = [j.future.result(timeout=600) for j in flood]
        seen["stats"] = e.stats()
        # bob's same request alone on this engine: what the flood must not change
        seen["bob_alone_ids"] = e.submit(Job("generate", PROMPT, other_row, "bob", SHORT, 0.0)).result(600).ids
    finally:
        e.close()
    return seen


@pytest.mark.parametrize("flood_method", ["norm", "lora"])
def test_another_users_short_completion_is_admitted_at_the_next_admission_under_a_flood(tiny, rows, flood_method):
    norm, lora = rows
    flood_row, other_row = (norm, lora) if flood_method == "norm" else (lora, norm)
    seen = flood_then_one(tiny, flood_row, other_row)
    assert seen["ann_rows"] == 8 and seen["ann_waiting"] == 8  # ann holds her half; her other 8 wait
    # bob's first token comes from his prefill at the next admission, then SHORT - 1 decode steps: nothing waits
    # on ann's rows (which had LONG - 3 steps to go)
    assert seen["done_step"] - seen["submit_step"] <= SHORT
    assert seen["bob_ids"] == seen["bob_alone_ids"]
    assert all(len(g.ids) == LONG for g in seen["flood"]) and seen["stats"]["most_rows_one_user"] == 8
    assert seen["stats"]["largest_batch"] == 9  # ann's 8 and bob's 1


def test_without_the_cap_the_same_completion_waits_for_the_flood(tiny, rows):
    """The contrast: with max_rows_per_user = max_batch ann's 16 rows fill the batch, and bob's completion waits
    until they finish (LONG - 3 more steps)."""
    norm, lora = rows
    seen = flood_then_one(tiny, lora, norm, max_rows_per_user=16)
    assert seen["ann_rows"] == 16 and seen["ann_waiting"] == 0
    assert seen["done_step"] - seen["submit_step"] >= LONG - 3
    assert seen["bob_ids"] == seen["bob_alone_ids"]


@pytest.mark.parametrize("cap, most", [(None, 8), (16, 16), (5, 5)])
def test_a_lone_user_holds_at_most_the_cap_even_when_nobody_else_waits(tiny, rows, cap, most):
    """The decision: no row is taken back once given, so the cap holds for a lone user too (rows it left free are
    there when another user arrives); --max-rows-per-user = --max-batch lets one user fill the batch instead."""
    norm, lora = rows
    e = engine(tiny, StepHook(), max_rows_per_user=cap)
    try:
        jobs = [Job("generate", PROMPT, lora if i % 2 else norm, "ann", 8, 0.0) for i in range(16)]
        with e._cv:
            for j in jobs:
                e.submit(j)
        assert all(len(j.future.result(timeout=600).ids) == 8 for j in jobs)
        st = e.stats()
        assert st["max_rows_per_user"] == most and st["most_rows_one_user"] == most and st["largest_batch"] == most
    finally:
        e.close()


def test_fair_queue_take_keeps_a_user_at_its_quota_in_place():
    q = FairQueue()
    jobs = [Job("generate", [1], None, u) for u in ("a", "a", "a", "b", "c", "c")]
    for j in jobs:
        q.push(j)
    quota = {"a": 1, "b": 5, "c": 0}
    assert q.take(6, quota=quota.get) == [jobs[0], jobs[3]]  # a: one; b: its one; c: none
    assert len(q) == 4
    assert q.take(6, quota=lambda u: 0) == [] and len(q) == 4  # nobody may take: nothing, and no endless loop
    assert q.take(6) == [jobs[4], jobs[1], jobs[5], jobs[2]]  # a was served last time, c not: c goes first
