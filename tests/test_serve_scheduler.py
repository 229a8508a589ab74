"""The continuous-batching engine on the tiny base: rows join and leave between steps and still get exactly
what each user gets alone; fair admission; cancelled rows leave; one row's failure is only its own."""
import select
import socket
import threading
import time

import pytest
import torch

from sharedllm.serve.hangup import POLLRDHUP, hung_up
from sharedllm.adapters.norm import Gains
from sharedllm.adapters.rows import RowModel, RowState
from sharedllm.serve.scheduler import Engine, FairQueue, Job
from sharedllm.serve.textstream import TextTail

from .serve_kit import reference_score
from .test_serve_rowgains import perturbed

PROMPTS = [[256, *b"the cat sat on the mat"], [256, *b"abc"], [256, *b"a quick brown fox jumped over"],
           [256, *b"x"], [256, *b"hello there, general"]]


@pytest.fixture(scope="module")
def users(tiny):
    return [perturbed(tiny, s, scale=0.6) for s in range(len(PROMPTS))]


@pytest.fixture
def engine(tiny):
    e = Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=8)
    yield e
    e.close()


def alone(user, prompt, n):
    out = user.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def gen(engine, user, prompt, n, name, **kw):
    return Job("generate", prompt, engine.rgm.row(user.params), name, n, 0.0, **kw)


def test_rows_join_a_running_batch_and_match_each_user_alone(engine, users):
    """A long generation is running; shorter ones of other users and a score join it mid-way and finish first."""
    finished_while_long_ran = []
    late = [gen(engine, users[i], PROMPTS[i], n, f"u{i}") for i, n in ((1, 5), (2, 9), (3, 1), (4, 7))]
    score = Job("score", PROMPTS[0], engine.rgm.row(users[1].params), "u1")
    started = threading.Event()

    def first_piece(_piece):
        if not started.is_set():  # runs on the engine thread: the others arrive while the long row decodes
            started.set()
            for j in late + [score]:
                engine.submit(j)
                j.future.add_done_callback(lambda f: finished_while_long_ran.append(not long.future.done()))

    long = gen(engine, users[0], PROMPTS[0], 60, "u0", on_text=first_piece)
    engine.submit(long)
    assert long.future.result(timeout=120).ids == alone(users[0], PROMPTS[0], 60)
    for j, i in zip(late, (1, 2, 3, 4)):
        got = j.future.result(timeout=60)
        assert got.ids == alone(users[i], PROMPTS[i], j.max_tokens) and got.finish_reason == "length"
    assert score.future.result(timeout=60).logprob == pytest.approx(reference_score(users[1].model, PROMPTS[0]),
                                                                    abs=1e-4)
    assert started.is_set() and finished_while_long_ran == [True] * 5
    assert engine.stats()["largest_batch"] >= 4 and engine.stats()["active_rows"] == 0


def test_fair_queue_serves_users_in_turn():
    q = FairQueue()
    jobs = [Job("generate", [1], None, u) for u in ("a", "a", "a", "a", "b", "c")]
    for j in jobs:
        q.push(j)
    jobs[1].future.cancel()  # left while waiting: skipped
    assert q.take(3) == [jobs[0], jobs[4], jobs[5]]
    assert q.take(5) == [jobs[2], jobs[3]] and len(q) == 0
    for j in jobs[:2] + jobs[4:5]:
        q.push(Job("generate", [1] * 10, None, j.user))
    assert len(q.take(3, fits=lambda batch, job: (len(batch) + 1) * 10 <= 20)) == 2  # a token budget


@pytest.mark.parametrize("budget", [10_000, 30])
def test_a_prefill_budget_spreads_a_burst_over_steps_and_changes_no_output(tiny, users, budget):
    """Four prompts of 4-30 positions queued at once: a budget of 10,000 admits them in one pass (the first token of
    each comes from that prefill, so 5 tokens take 4 steps); a budget of 30 admits one per step (3 more steps).
    Either way every row gets exactly what its user gets alone."""
    e = Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=8, prefill_budget=budget)
    try:
        picked = [0, 1, 2, 4]
        jobs = [gen(e, users[i], PROMPTS[i], 5, f"u{i}") for i in picked]
        with e._cv:  # all queued before the engine thread looks
            for j in jobs:
                e.submit(j)
        for j, i in zip(jobs, picked):
            assert j.future.result(timeout=60).ids == alone(users[i], PROMPTS[i], 5)
        assert e.stats()["decode_steps"] == (4 if budget > 1000 else 4 + 3)
    finally:
        e.close()


def test_the_serve_command_refuses_a_prefill_budget_below_one(capsys):
    from sharedllm.cli import build_parser

    parser, _ = build_parser()
    assert parser.parse_args(["serve", "--prefill-budget", "512"]).prefill_budget == 512
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--prefill-budget", "0"])
    assert "--prefill-budget" in capsys.readouterr().err


def test_a_cancelled_row_leaves_at_the_next_step(engine, users):
    stop_here = threading.Event()

    def cancel_self(_piece):
        if not stop_here.is_set():
            stop_here.set()
            doomed.future.cancel()  # as the HTTP layer does when the client disconnects

    doomed = gen(engine, users[0], PROMPTS[0], 500, "u0", on_text=cancel_self)
    other = gen(engine, users[1], PROMPTS[1], 12, "u1")
    engine.submit(doomed)
    engine.submit(other)
    assert other.future.result(timeout=60).ids == alone(users[1], PROMPTS[1], 12)
    assert doomed.future.cancelled() and engine.stats()["active_rows"] == 0
    assert engine.stats()["decode_steps"] < 100  # the 500-token row did not run on


def tcp_pair():
    """(client, server) ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        client = socket.create_connection(ls.getsockname())
        server, _ = ls.accept()
    return client, server


def until(cond, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


needs_rdhup = pytest.mark.skipif(POLLRDHUP is None or not hasattr(select, "poll"), reason="needs poll + POLLRDHUP")


@needs_rdhup
def test_hung_up_tells_a_closed_connection_from_an_open_one():
    (c1, s1), (c2, s2), (c3, s3) = tcp_pair(), tcp_pair(), tcp_pair()
    try:
        c2.sendall(b"more of the request")  # unread data is not a hang-up
        assert hung_up([s1, None, s2, s3]) == [False, False, False, False]
        c1.close()
        c3.shutdown(socket.SHUT_RDWR)
        s2.close()  # our own end closed: gone too
        until(lambda: hung_up([s1, s3]) == [True, True])
        assert hung_up([s1, None, s2, s3]) == [True, False, True, True] and hung_up([]) == []
    finally:
        for s in (s1, c2, s3, c3):
            s.close()


@needs_rdhup
def test_a_row_whose_connection_closes_leaves_at_the_next_step_without_the_http_side(engine, users):
    """Nobody cancels the future here: the engine sees the closed socket itself and drops the row before its next
    decode step; the other row (its connection open) runs to the end and matches its user alone."""
    (c_doomed, s_doomed), (c_other, s_other) = tcp_pair(), tcp_pair()
    try:
        doomed = gen(engine, users[0], PROMPTS[0], 1000, "u0", conn=s_doomed)
        other = gen(engine, users[1], PROMPTS[1], 40, "u1", conn=s_other)
        with engine._cv:
            engine.submit(doomed)
            engine.submit(other)
        until(lambda: engine.stats()["decode_steps"] >= 2)
        c_doomed.close()
        until(lambda: hung_up([s_doomed]) == [True])  # the disconnect has reached the server's socket
        at_close = engine.steps
        until(lambda: doomed.drop_step is not None)
        assert doomed.drop_step <= at_close + 1  # at most the step that was running when the close arrived
        assert doomed.future.cancelled() and engine.dropped == 1 and engine.stats()["cancel_lag_steps_max"] <= 1
        assert other.future.result(timeout=120).ids == alone(users[1], PROMPTS[1], 40)
        assert engine.stats()["active_rows"] == 0 and len(engine.kv) == 0 and engine.kv.nbytes == 0  # no KV left
    finally:
        for s in (c_other, s_doomed, s_other):
            s.close()


@needs_rdhup
def test_a_waiting_job_whose_connection_closed_is_never_started(tiny, users):
    e = Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=1)
    (c1, s1), (c2, s2) = tcp_pair(), tcp_pair()
    try:
        c2.close()  # this client leaves while its request waits behind another
        until(lambda: hung_up([s2]) == [True])
        first = gen(e, users[0], PROMPTS[0], 8, "u0", conn=s1)
        waiting = gen(e, users[1], PROMPTS[1], 1000, "u1", conn=s2)
        with e._cv:
            e.submit(first)
            e.submit(waiting)
        assert first.future.result(timeout=120).ids == alone(users[0], PROMPTS[0], 8)
        until(lambda: waiting.future.done())
        assert waiting.future.cancelled() and e.stats()["cancelled_rows"] == 1 and e.dropped == 0
        assert e.stats()["queued"] == 0 and e.stats()["active_rows"] == 0
    finally:
        e.close()
        for s in (c1, s1, s2):
            s.close()


def test_one_rows_failure_fails_only_that_request(engine, users, tiny):
    def boom(_piece):
        raise RuntimeError("client callback failed")

    bad_gains = RowState("norm", Gains(tuple(v[:-1] for v in engine.rgm.base_gains)))  # wrong width: prefill raises
    jobs = [gen(engine, users[0], PROMPTS[0], 6, "u0", on_text=boom),
            Job("generate", PROMPTS[2], bad_gains, "u2", 6, 0.0),
            gen(engine, users[1], PROMPTS[1], 6, "u1"),
            Job("score", PROMPTS[2], bad_gains, "u2"),
            Job("score", PROMPTS[1], engine.rgm.row(users[3].params), "u3")]
    with engine._cv:  # submit all at once so that they share the first passes
        for j in jobs:
            engine.submit(j)
    with pytest.raises(RuntimeError, match="callback"):
        jobs[0].future.result(timeout=60)
    for j in (jobs[1], jobs[3]):
        with pytest.raises(Exception):
            j.future.result(timeout=60)
    assert jobs[2].future.result(timeout=60).ids == alone(users[1], PROMPTS[1], 6)
    assert jobs[4].future.result(timeout=60).logprob == pytest.approx(
        reference_score(users[3].model, PROMPTS[1]), abs=1e-4)


def test_sampled_rows_repeat_with_their_seed_and_top_p_narrows(engine, users):
    def run(**kw):
        return engine.submit(Job("generate", PROMPTS[2], engine.rgm.base_row, "u", 16, 1.0, **kw)).result(60).ids
    assert run(seed=3) == run(seed=3) and run(seed=3) != run(seed=4)
    tiny_p = run(seed=3, top_p=1e-6)  # the nucleus is the single most likely token: greedy
    greedy = engine.submit(Job("generate", PROMPTS[2], engine.rgm.base_row, "u", 16, 0.0)).result(60).ids
    assert tiny_p == greedy


def test_stop_strings_never_cut_a_multibyte_character():
    text = "naïve café → done"
    ids = list(text.encode())
    decode = lambda t: bytes(i for i in t if i < 256).decode("utf-8", errors="replace")

    def run(stop):
        tail, pieces, hit = TextTail(decode, stop), [], False
        for t in ids:
            piece, hit = tail.push(t)
            pieces.append(piece)
            if hit:
                break
        pieces.append(tail.finish())
        assert all("\ufffd" not in p for p in pieces)  # no half character is ever handed out
        return "".join(pieces), hit

    assert run(("ï",)) == ("na", True)
    assert run(("ve",)) == ("naï", True)
    assert run(("→", "é")) == ("naïve caf", True)
    assert run((" d",)) == ("naïve café →", True)
    assert run(("\ufffd",)) == (text, False)  # a half-received character never matches as U+FFFD
    assert run(("zz",)) == (text, False)


def test_stats_count_a_cancelled_row_once_and_tell_active_from_generating_rows(tiny):
    """A row cancelled mid-generation: counted once in cancelled_rows and in the Prometheus counter; while it is
    still in the batch (cancelled, not yet dropped) it is active but no longer generating."""
    from sharedllm.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    e = Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=8, metrics=metrics)
    try:
        with e._cv:  # hold the engine between steps: both rows are in the batch
            long = e.submit(Job("generate", PROMPTS[0], e.rgm.base_row, "a", 200, 0.0))
            short = e.submit(Job("generate", PROMPTS[1], e.rgm.base_row, "b", 100, 0.0))
        while e.stats()["active_rows"] < 2:
            time.sleep(0.01)
        with e._cv:
            long.cancel()
            s = e.stats()
            assert s["active_rows"] - s["generating_rows"] in (0, 1)  # the cancelled row, until it is dropped
        short.result(60)
        deadline = time.monotonic() + 60  # the finished row leaves the batch right after its result is set
        while e.stats()["active_rows"] and time.monotonic() < deadline:
            time.sleep(0.01)
        s = e.stats()
        assert s["cancelled_rows"] == 1 and s["active_rows"] == s["generating_rows"] == 0
        assert metrics.rows_dropped._value.get() == 1
    finally:
        e.close()


def test_ignore_eos_keeps_a_row_generating_past_the_end_of_text_token(tiny, users):
    """vLLM's `ignore_eos`: a row whose greedy continuation emits the end-of-text token stops there by default and
    runs on to max_tokens with ignore_eos (its tokens then equal the unstopped continuation alone)."""
    want = alone(users[0], PROMPTS[0], 6)
    e = Engine(RowModel(tiny), tiny.tokenizer.decode, eos_id=want[2], max_batch=8)  # the 3rd greedy token ends it
    try:
        stopped, kept = gen(e, users[0], PROMPTS[0], 6, "u0"), gen(e, users[0], PROMPTS[0], 6, "u0", ignore_eos=True)
        for j in (stopped, kept):
            e.submit(j)
        a, b = stopped.future.result(timeout=120), kept.future.result(timeout=120)
    finally:
        e.close()
    first = want.index(want[2])  # where that token first appears
    assert (a.ids, a.finish_reason) == (want[:first + 1], "stop")
    assert (b.ids, b.finish_reason) == (want, "length")
