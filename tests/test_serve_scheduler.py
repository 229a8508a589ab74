"""The continuous-batching engine on the tiny base: rows join and leave between steps and still get exactly
what each user gets alone; fair admission; cancelled rows leave; one row's failure is only its own."""
import threading

import pytest
import torch

from sharedllm.serve.rowgains import Gains, RowGainModel
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
    e = Engine(RowGainModel(tiny), tiny.tokenizer.decode, eos_id=None, max_batch=8)
    yield e
    e.close()


def alone(user, prompt, n):
    out = user.model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def gen(engine, user, prompt, n, name, **kw):
    return Job("generate", prompt, engine.rgm.gains_from(user.params), name, n, 0.0, **kw)


def test_rows_join_a_running_batch_and_match_each_user_alone(engine, users):
    """A long generation is running; shorter ones of other users and a score join it mid-way and finish first."""
    finished_while_long_ran = []
    late = [gen(engine, users[i], PROMPTS[i], n, f"u{i}") for i, n in ((1, 5), (2, 9), (3, 1), (4, 7))]
    score = Job("score", PROMPTS[0], engine.rgm.gains_from(users[1].params), "u1")
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


def test_one_rows_failure_fails_only_that_request(engine, users, tiny):
    def boom(_piece):
        raise RuntimeError("client callback failed")

    bad_gains = Gains(tuple(v[:-1] for v in engine.rgm.base_gains.vectors))  # wrong width: its prefill raises
    jobs = [gen(engine, users[0], PROMPTS[0], 6, "u0", on_text=boom),
            Job("generate", PROMPTS[2], bad_gains, "u2", 6, 0.0),
            gen(engine, users[1], PROMPTS[1], 6, "u1"),
            Job("score", PROMPTS[2], bad_gains, "u2"),
            Job("score", PROMPTS[1], engine.rgm.gains_from(users[3].params), "u3")]
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
        return engine.submit(Job("generate", PROMPTS[2], engine.rgm.base_gains, "u", 16, 1.0, **kw)).result(60).ids
    assert run(seed=3) == run(seed=3) and run(seed=3) != run(seed=4)
    tiny_p = run(seed=3, top_p=1e-6)  # the nucleus is the single most likely token: greedy
    greedy = engine.submit(Job("generate", PROMPTS[2], engine.rgm.base_gains, "u", 16, 0.0)).result(60).ids
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
