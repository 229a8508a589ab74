"""`sharedllm adapt --manifest ... --out-dir D --ray [--store S]`: a fleet of users as Ray tasks (tiny base).

A real local Ray instance (2 workers): 5 users land in D and in a server store and verify, a rerun skips them all;
a worker that dies mid-task loses no user and writes none twice into the store; a user with a bad text fails alone
with a clear message and the command exits 1. The driver's retry, split and store rules are also run against an
in-process stand-in for Ray (fast, no cluster)."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest

from sharedllm import wire
from sharedllm.bets import ray_units
from sharedllm.commands import adapt, adapt_ray
from sharedllm.store import AdapterStore

from .conftest import english

TRAIN = ["--base", "tiny", "--steps", "3", "--seq", "64", "--window", "64", "--eval-tokens", "128", "--lr", "1e-2"]


def manifest(tmp_path, n: int, bad: dict | None = None):
    users = {}
    for i in range(n):
        (tmp_path / f"t{i}.txt").write_text(english(3000, seed=i))
        users[f"u{i}"] = f"t{i}.txt"
    for user, text in (bad or {}).items():
        if text is not None:
            (tmp_path / f"{user}.txt").write_text(text)
        users[user] = f"{user}.txt"
    path = tmp_path / "users.json"
    path.write_text(json.dumps(users))
    return path


def run_adapt(tmp_path, *extra) -> dict:
    """The adapt subcommand as the CLI runs it (its own parser: the other subcommands are not needed here)."""
    p = argparse.ArgumentParser()
    adapt.configure(p)
    args = p.parse_args(["--manifest", str(tmp_path / "users.json"), "--out-dir", str(tmp_path / "D"), "--ray",
                         "--json-progress", str(tmp_path / "progress.jsonl"), *TRAIN, *extra])
    return adapt.run(args)


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]


class CountPuts:
    def __init__(self, monkeypatch):
        self.users = []
        real = AdapterStore.put
        monkeypatch.setattr(AdapterStore, "put", lambda store, user, *a: self.users.append(user) or real(store, user, *a))


def check_landed(tmp_path, users, store_dir=None) -> None:
    """Every user's file in D parses, is bound to the tiny base and is norm; the store holds exactly those bytes."""
    from sharedllm.base import load_base

    fp = load_base("tiny").fingerprint
    store = AdapterStore(store_dir) if store_dir else None
    for user in users:
        path = tmp_path / "D" / f"{user}.safetensors"
        _, meta = wire.read_file(path)
        wire.check_binding(meta, fp, str(path))
        assert meta["method"] == "norm" and meta["user"] == user
        if store:
            assert store.get(user).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if store:
        assert store.count() == len(users) and store.check()["orphan_files"] == []
        store.close()


# ---- without a cluster: an in-process stand-in for Ray ----

class Ref:
    def __init__(self, value, error):
        self.value, self.error = value, error


class InlineRay:
    """Runs each task at once in this process; a task's exception comes back as a RayError from get()."""

    class exceptions:
        class RayError(Exception):
            pass

    def __init__(self):
        self.sent = []

    def remote(self, fn):
        ray = self

        class Task:
            def options(self, **kw):
                return self

            def remote(self, *args):
                if fn is adapt_ray.train_users:
                    ray.sent.append(args[1])
                try:
                    return Ref(fn(*args), None)
                except Exception as e:  # noqa: BLE001
                    return Ref(None, e)
        return Task()

    def put(self, value):  # an object-store ref: here the value itself, passed on to the task
        return value

    def wait(self, refs, num_returns):
        return refs[:1], refs[1:]

    def get(self, ref):
        if ref.error is not None:
            raise self.exceptions.RayError(f"task failed: {ref.error}")
        return ref.value

    def cluster_resources(self):
        return {"CPU": 2}


@pytest.fixture
def inline(monkeypatch):
    fake = InlineRay()
    monkeypatch.setattr(ray_units, "ray_module", lambda: fake)
    monkeypatch.setattr(ray_units, "start", lambda *a, **k: False)
    monkeypatch.setattr(ray_units, "one_line", lambda e: str(e))
    return fake


def test_the_store_names_users_as_the_server_does():
    from sharedllm.serve.app import USER_NAME

    assert adapt_ray.SERVER_USER_NAME.pattern == USER_NAME.pattern


def test_fleet_options_without_ray_are_one_clear_error(tmp_path):
    p = argparse.ArgumentParser()
    adapt.configure(p)
    manifest(tmp_path, 1)
    args = p.parse_args(["--manifest", str(tmp_path / "users.json"), "--out-dir", str(tmp_path / "D"), "--store",
                         str(tmp_path / "S"), *TRAIN])
    with pytest.raises(adapt_ray.SharedLLMError, match="--store is for a fleet on Ray: add --ray"):
        adapt.run(args)


def test_a_failing_fleet_is_split_and_its_bad_user_reported_after_its_retries(inline, tmp_path, monkeypatch):
    """u1 raises in every task: its fleet of 2 fails, each user goes on alone; u0 lands on its second attempt,
    u1 fails after 2 attempts with the task's error; the other users are not held up."""
    manifest(tmp_path, 5)
    monkeypatch.setenv(adapt_ray.FAULT_ENV, "raise|u1")
    puts = CountPuts(monkeypatch)
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert not r["ok"] and r["trained"] == 4 and r["failed"] == 1
    assert "injected failure in the task of user u1" in r["failures"]["u1"]
    rows = {u["user"]: u for u in r["users"]}
    assert rows["u0"]["attempts"] == 2 and rows["u1"]["attempts"] == 2 and rows["u2"]["attempts"] == 1
    assert [len(users) for users in inline.sent[:2]] == [2, 2] and sorted(puts.users) == ["u0", "u2", "u3", "u4"]
    ev = events(tmp_path)
    assert {e["user"] for e in ev if e["event"] == "retry"} == {"u0", "u1"}
    assert ev[-1]["event"] == "end" and ev[-1]["failed"] == 1 and ev[-1]["done"] == 4
    check_landed(tmp_path, ["u0", "u2", "u3", "u4"], tmp_path / "S")
    text = adapt.render(r)
    assert "FAILED u1: " in text and "1 of 5 users failed; run the same command again" in text

    monkeypatch.delenv(adapt_ray.FAULT_ENV)
    inline.sent.clear()
    again = run_adapt(tmp_path, "--store", str(tmp_path / "S"))  # only the failed user is trained
    assert again["ok"] and again["trained"] == 1 and again["skipped"] == 4 and len(inline.sent) == 1
    assert [u["user"] for u in inline.sent[0]] == ["u1"] and puts.users.count("u1") == 1
    check_landed(tmp_path, [f"u{i}" for i in range(5)], tmp_path / "S")


def test_resume_puts_an_adapter_trained_earlier_into_the_store_without_training_it(inline, tmp_path, monkeypatch):
    manifest(tmp_path, 2)
    first = run_adapt(tmp_path)  # D only
    assert first["trained"] == 2 and first["store"] is None
    inline.sent.clear()
    (tmp_path / "D" / "u1.safetensors").write_bytes(b"not an adapter")  # a damaged file is trained again
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert r["stored"] == 1 and r["trained"] == 1 and [u["user"] for u in inline.sent[-1]] == ["u1"]
    assert r["store_writes"] == 2 and r["users_created"] == 2
    check_landed(tmp_path, ["u0", "u1"], tmp_path / "S")
    monkeypatch.setattr(ray_units, "ray_module", lambda: pytest.fail("Ray was started with nothing to train"))
    done = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert done["ok"] and done["skipped"] == 2 and done["store_writes"] == 0


def test_a_stored_adapter_of_another_method_is_kept_unless_replace(inline, tmp_path, monkeypatch):
    manifest(tmp_path, 1)
    assert run_adapt(tmp_path, "--method", "lora", "--out-dir", str(tmp_path / "L"),
                     "--store", str(tmp_path / "S"))["trained"] == 1
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"))  # norm: the store's lora adapter stays
    assert not r["ok"] and "has another adapter in the store" in r["failures"]["u0"] and "--replace" in r["failures"]["u0"]
    assert AdapterStore(tmp_path / "S").get("u0").meta["method"] == "lora"
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"), "--replace")
    assert r["ok"] and r["trained"] == 1
    check_landed(tmp_path, ["u0"], tmp_path / "S")


def test_store_tokens_are_recorded_before_the_user_exists_and_reused(tmp_path):
    store = AdapterStore(tmp_path / "S")
    path = tmp_path / "tokens.jsonl"
    tokens = adapt_ray._Tokens(path)
    tokens.known["ann"] = "sk-written-by-a-run-that-stopped"  # its line was written, the user never created
    tokens.create(store, "ann")
    tokens.create(store, "bob")
    assert store.user_for_token("sk-written-by-a-run-that-stopped") == "ann"
    bob = [json.loads(x) for x in path.read_text().splitlines() if json.loads(x)["user"] == "bob"]
    assert len(bob) == 1 and store.user_for_token(bob[0]["token"]) == "bob" and path.stat().st_mode & 0o777 == 0o600
    store.create_user("cy")  # created meanwhile by an admin: theirs stands, ours is marked as never valid
    tokens.create(store, "cy")
    again = adapt_ray._Tokens(path)
    assert again.known["cy"] is None and tokens.created == 2
    store.close()


def test_a_second_run_on_the_same_store_is_refused(tmp_path):
    import contextlib

    with contextlib.ExitStack() as stack:
        args = argparse.Namespace(store=str(tmp_path / "S"), base="tiny")
        adapt_ray._open_store(args, stack)
        with pytest.raises(adapt_ray.SharedLLMError, match="another `sharedllm adapt --ray` is writing the store"):
            adapt_ray._open_store(args, contextlib.ExitStack())


# ---- a real local Ray instance: 2 workers ----

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    started = ray_units.start(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_five_users_on_two_workers_land_in_the_store_and_a_rerun_skips_them(local_ray, tmp_path, monkeypatch):
    manifest(tmp_path, 5)
    puts = CountPuts(monkeypatch)
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert r["ok"] and r["trained"] == 5 and r["store_writes"] == 5 and sorted(puts.users) == [f"u{i}" for i in range(5)]
    assert {u["fleet"] for u in r["users"]} <= {1, 2} and any(u["fleet"] == 2 for u in r["users"])
    check_landed(tmp_path, [f"u{i}" for i in range(5)], tmp_path / "S")
    store = AdapterStore(tmp_path / "S")
    lines = [json.loads(x) for x in (tmp_path / "D" / adapt_ray.TOKENS_FILE).read_text().splitlines()]
    assert sorted(store.user_for_token(x["token"]) for x in lines) == [f"u{i}" for i in range(5)]
    store.close()
    assert [e["done"] for e in events(tmp_path) if e["event"] == "trained"] == [1, 2, 3, 4, 5]

    again = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert again["ok"] and again["skipped"] == 5 and again["trained"] == 0 and len(puts.users) == 5


def test_a_worker_killed_mid_task_loses_no_user_and_stores_none_twice(local_ray, tmp_path, monkeypatch):
    """The worker training u2's fleet os._exit()s once after training (its result never comes back): both users of
    that task are trained again, each alone; every user lands once in the store."""
    manifest(tmp_path, 5)
    marker = tmp_path / "died"
    monkeypatch.setenv(adapt_ray.FAULT_ENV, f"exit-once|u2|{marker}")
    puts = CountPuts(monkeypatch)
    r = run_adapt(tmp_path, "--store", str(tmp_path / "S"))
    assert marker.is_file()  # the worker really died
    assert r["ok"] and r["trained"] == 5 and sorted(puts.users) == [f"u{i}" for i in range(5)]
    rows = {u["user"]: u for u in r["users"]}
    retried = {e["user"] for e in events(tmp_path) if e["event"] == "retry"}
    assert "u2" in retried and len(retried) == 2 and all(rows[u]["attempts"] == 2 for u in retried)
    check_landed(tmp_path, [f"u{i}" for i in range(5)], tmp_path / "S")


def test_a_user_with_a_bad_text_fails_alone_and_the_command_exits_1(local_ray, tmp_path, capsys):
    from sharedllm.cli import main

    manifest(tmp_path, 2, bad={"short": "too short", "gone": None})
    code = main(["adapt", "--manifest", str(tmp_path / "users.json"), "--out-dir", str(tmp_path / "D"), "--ray",
                 "--store", str(tmp_path / "S"), *TRAIN])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED short: " in out and "fewer than one training window" in out
    assert "FAILED gone: " in out and "no such file or directory" in out
    assert "2 of 4 users failed" in out and "short: FAILED: " in err
    check_landed(tmp_path, ["u0", "u1"], tmp_path / "S")
