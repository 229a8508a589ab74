"""A bet's units dispatched as Ray tasks: a real local Ray instance (2 workers, tiny base), a worker that dies
mid-unit, a unit that keeps failing, and a resume. The enumerate / target passes are also tested without Ray."""
from __future__ import annotations

import json

import pytest

from sharedllm.bets import ray_units
from sharedllm.bets.context import Checkpoint, Context, UnitDone
from sharedllm.bets.harness import Options, get_bet, run_bet
from sharedllm.commands.bet import add_options, options_from

from .conftest import CORPORA

USERS = ["programmer/requests", "novelist/austen_pride_and_prejudice"]
UNITS = {f"{k}/{u}" for u in USERS for k in ("base", "random")} | {
    f"{k}/{u}/seed0" for u in USERS for k in ("confusion", "lora")}
FLEETS = {f"fleet/{k}/{'+'.join(USERS)}" for k in ("seed0", "random")}  # the two users' norm adapters, per pass
FIRST = {k for k in UNITS if not k.startswith(("confusion/", "random/"))} | FLEETS  # what waits for no other unit


def quick_scale(tmp_path, ray: str | None, **kw) -> Options:
    return Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path / "res", users=USERS,
                   seeds=1, ternary="none", ray=ray, **kw)


# ---- without Ray: the passes a Ray run is made of ----

def test_enumerate_then_compute_one_unit_as_a_worker_would(tmp_path):
    bet, opts = get_bet("scale_protocol"), quick_scale(tmp_path, None, fleet=1)
    ctx = Context(bet, opts)
    ctx.deferred = []
    assert bet.run(ctx) == [] and set(ctx.deferred) == UNITS  # nothing computed, every unit listed
    plain = json.dumps(ray_units._plain(opts))
    done = ray_units.compute_unit(bet.id, plain, "lora/programmer/requests/seed0")
    assert {c["method"] for c in done["cells"]} == {"lora"} and len(done["cells"]) == ctx.n_texts
    assert done["users"] == ["programmer/requests"] and done["seeds"] == [0]
    assert list(done["curves"]) == ["programmer/requests/lora/seed0"] and done["wall_s"] >= 0
    assert not ctx.checkpoint.path.exists()  # a worker never writes the checkpoint


def test_norm_adapters_are_trained_in_fleet_units_before_the_units_that_score_them(tmp_path):
    """--fleet 2 (the default): the first pass sends the fleet units (each trains both users' norm adapters in one
    pass) and no unit that scores a norm adapter; a worker's fleet unit writes both adapters; the next pass sends
    the scoring units. A fleet unit that failed lets its scoring units run (each then trains alone)."""
    bet, opts = get_bet("scale_protocol"), quick_scale(tmp_path, None)
    ctx = Context(bet, opts)
    ctx.deferred = []
    bet.run(ctx)
    assert set(ctx.deferred) == FIRST
    plain, conf = json.dumps(ray_units._plain(opts)), sorted(FLEETS)[1]  # fleet/seed0/...: the confusion rows'
    done = ray_units.compute_unit(bet.id, plain, conf)
    assert done["cells"] == [] and sorted(done["users"]) == sorted(USERS)
    sides = [json.loads(p.read_text()) for p in (tmp_path / "out" / "adapters").rglob("norm_seed0*.json")]
    assert len(sides) == 2 and all(s["fleet"]["users"] == 2 for s in sides)
    ctx.checkpoint.put(conf, done)
    ctx.checkpoint.fail(sorted(FLEETS)[0], "injected")  # fleet/random/...
    ctx.deferred = []
    bet.run(ctx)
    assert set(ctx.deferred) == (FIRST - FLEETS) | {k for k in UNITS if k.startswith(("confusion/", "random/"))} | {
        sorted(FLEETS)[0]}  # the failed fleet is tried again beside its scoring units


def test_a_quick_scale_run_in_fleets_equals_each_user_trained_alone(tmp_path):
    bet = get_bet("scale_protocol")
    alone = run_bet(bet, quick_scale(tmp_path / "alone", None, fleet=1))
    fleet = run_bet(bet, quick_scale(tmp_path / "fleet", None))
    key = lambda c: (c["kind"], c.get("adapter"), c.get("method"), c["user"], c["text"])  # noqa: E731
    by_key = {key(c): c["nll"] for c in alone["cells"]}
    assert sorted(map(key, fleet["cells"])) == sorted(by_key)
    assert all(c["nll"] == pytest.approx(by_key[key(c)], rel=1e-5) for c in fleet["cells"])
    sides = {p: json.loads(p.read_text()) for p in (tmp_path / "fleet" / "out").rglob("norm*.json")}
    assert len(sides) == 4 and all(s["fleet"]["users"] == 2 for s in sides.values())  # confusion and random rows
    assert not any("fleet" in json.loads(p.read_text()) for p in (tmp_path / "alone" / "out").rglob("norm*.json"))
    assert "fleet" in fleet["config"] and "fleet" not in alone["config"]
    assert fleet["verdict"] == alone["verdict"]


def test_a_unit_that_needs_other_units_cells_is_reached_on_a_worker(tmp_path, monkeypatch):
    """lr_sensitivity's confusion rows exist only once the grid's cells are known: a worker sent such a unit must
    see the units the driver had finished (a worker with an empty checkpoint never reached it)."""
    bet = get_bet("scale_protocol")

    def run(ctx):  # unit b's key and cells depend on unit a's cells
        cells = ctx.unit("a", lambda: [{"kind": "x", "v": 2}])
        if ctx.deferred is not None or not cells:
            return cells
        n = sum(c["v"] for c in cells)
        return cells + ctx.unit(f"b{n}", lambda: [{"kind": "y", "v": 10 * n}])

    monkeypatch.setattr(bet, "run", run)
    plain = json.dumps(ray_units._plain(quick_scale(tmp_path, None)))
    a = {"cells": [{"kind": "x", "v": 2}], "users": [], "seeds": [], "curves": {}, "wall_s": 0.0}
    assert ray_units.compute_unit(bet.id, plain, "b2", {"a": a})["cells"] == [{"kind": "y", "v": 20}]
    with pytest.raises(ray_units.SharedLLMError, match="never reached unit 'b2'"):
        ray_units.compute_unit(bet.id, plain, "b2")


def test_quantising_is_a_unit_and_the_ternary_units_follow_it(tmp_path):
    """The ternary base is made by a unit of its own (on Ray, in a worker, not the driver); the ternary units are
    enumerated once its file exists."""
    bet = get_bet("scale_protocol")
    opts = Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path / "res", users=USERS, seeds=1, ternary=None)
    ctx = Context(bet, opts)
    ctx.deferred = []
    bet.run(ctx)
    quantise = [k for k in ctx.deferred if k.startswith("quantize/")]
    assert len(quantise) == 1 and not any(k.startswith("ternary/") for k in ctx.deferred)
    done = ray_units.compute_unit(bet.id, json.dumps(ray_units._plain(opts)), quantise[0])
    assert done["cells"] == [] and list((tmp_path / "out" / "ternary").rglob("*.safetensors"))
    ctx = Context(bet, opts)
    ctx.checkpoint.put(quantise[0], done)
    ctx.deferred = []
    bet.run(ctx)
    assert {k for k in ctx.deferred if k.startswith("fleet/ternary/")} and quantise[0] not in ctx.deferred


def test_a_target_outside_the_bet_is_an_error(tmp_path):
    opts = quick_scale(tmp_path, None)
    with pytest.raises(ray_units.SharedLLMError, match="never reached unit 'nope'"):
        ray_units.compute_unit("scale_protocol", json.dumps(ray_units._plain(opts)), "nope")


def test_unit_done_escapes_a_bets_broad_except(tmp_path):
    ctx = Context(get_bet("46"), Options(quick=True, corpora=CORPORA, out=tmp_path, results=tmp_path))
    ctx.target = "u"
    with pytest.raises(UnitDone):
        try:
            ctx.unit("u", lambda: [{"x": 1}])
        except Exception:  # noqa: BLE001 - what a careless bet might do
            pytest.fail("UnitDone must not be an Exception")


def test_checkpoint_records_failures_and_reads_the_old_format(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"stamp": {"bet": "b"}, "units": {"a": {"cells": [], "wall_s": 2.0}}}))
    cp = Checkpoint(path, {"bet": "b"})
    assert cp.get("a") == {"cells": [], "wall_s": 2.0} and cp.failed() == {} and cp.reused == ["a"]
    cp.fail("b", "RuntimeError: boom")
    assert json.loads(path.read_text())["failed"] == {"b": "RuntimeError: boom"}
    cp.put("b", {"cells": [], "wall_s": 1.0})
    again = Checkpoint(path, {"bet": "b"})
    assert again.failed() == {} and set(again._read()) == {"a", "b"} and again.wall_s() == 3.0
    assert "failed" not in json.loads(path.read_text())


def test_ray_options_from_the_command_line():
    from argparse import ArgumentParser

    p = ArgumentParser()
    add_options(p)
    assert options_from(p.parse_args(["--ray"])).ray == "local"
    assert options_from(p.parse_args(["--ray-address", "auto", "--ray-retries", "0"])).ray == "auto"
    assert options_from(p.parse_args([])).ray is None


def test_a_cluster_that_cannot_be_joined_is_one_clear_error(monkeypatch):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    if ray.is_initialized():
        pytest.skip("this process is already connected to Ray")
    tries = []

    def refuse(**kw):
        tries.append(kw)
        raise ConnectionError("nobody at 10.0.0.1:6379\nlong Ray traceback")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ray_units.SharedLLMError) as e:
        ray_units.start("10.0.0.1:6379")
    assert "could not join the Ray cluster at 10.0.0.1:6379" in str(e.value) and "\n" not in str(e.value)
    assert len(tries) == ray_units.START_TRIES and tries[0]["address"] == "10.0.0.1:6379"


# ---- a real local Ray instance ----

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    assert ray_units.start(None, num_cpus=2)
    yield ray
    ray.shutdown()


def test_a_quick_bet_on_ray_matches_the_sequential_run(local_ray, tmp_path):
    bet = get_bet("scale_protocol")
    seq = run_bet(bet, quick_scale(tmp_path / "seq", None))
    par = run_bet(bet, quick_scale(tmp_path / "ray", "local"))
    assert par["meta"]["ray"]["units_computed"] == len(UNITS | FLEETS) and "resumed" not in par["meta"]
    assert not par.get("incomplete") and not list((tmp_path / "ray" / "res" / "partial").glob("*.json"))
    key = lambda c: (c["kind"], c.get("adapter"), c.get("method"), c["user"], c["text"])  # noqa: E731
    assert sorted(map(key, par["cells"])) == sorted(map(key, seq["cells"]))
    by_key = {key(c): c["nll"] for c in seq["cells"]}
    assert all(c["nll"] == pytest.approx(by_key[key(c)], rel=1e-6) for c in par["cells"])
    assert par["verdict"] == seq["verdict"] == bet.verdict(par["cells"], par["criteria"])
    assert set(par["extras"]["loss_curves"]) == set(seq["extras"]["loss_curves"])
    assert sorted(par["config"]["users"]) == sorted(seq["config"]["users"]) and par["config"]["seeds"] == [0]


def test_a_worker_killed_mid_unit_is_retried(local_ray, tmp_path, monkeypatch):
    marker, victim = tmp_path / "died", "confusion/programmer/requests/seed0"
    monkeypatch.setenv(ray_units.FAULT_ENV, f"exit-once|{victim}|{marker}")
    result = run_bet(get_bet("scale_protocol"), quick_scale(tmp_path, "local"))
    assert marker.is_file()  # the worker really died (os._exit) once in that unit
    assert not result.get("incomplete") and result["meta"]["ray"]["units_computed"] == len(UNITS | FLEETS)
    assert any(c["kind"] == "confusion" and c["adapter"] == "programmer/requests" for c in result["cells"])


def test_a_failing_unit_is_recorded_and_a_sequential_rerun_does_only_it(local_ray, tmp_path, monkeypatch):
    victim = "lora/novelist/austen_pride_and_prejudice/seed0"
    monkeypatch.setenv(ray_units.FAULT_ENV, f"raise|{victim}")
    bet, opts = get_bet("scale_protocol"), quick_scale(tmp_path, "local", ray_retries=1)
    first = run_bet(bet, opts)
    inc = first["incomplete"]
    assert inc["missing"] == [victim] and "injected failure" in inc["failed"][victim]
    assert not any(c.get("method") == "lora" and c["user"] == "novelist/austen_pride_and_prejudice"
                   for c in first["cells"])  # listed as missing, never invented
    assert first["verdict"] == bet.verdict(first["cells"], first["criteria"])  # over the completed units
    partial = json.loads((tmp_path / "res" / "partial" / f"{bet.name}.json").read_text())
    assert set(partial["units"]) == (UNITS | FLEETS) - {victim} and set(partial["failed"]) == {victim}

    monkeypatch.delenv(ray_units.FAULT_ENV)
    trained, real = [], Context.adapter
    monkeypatch.setattr(Context, "adapter", lambda self, *a, **k: trained.append(a) or real(self, *a, **k))
    again = run_bet(bet, quick_scale(tmp_path, None))  # the incomplete result is not reused; the checkpoint is
    assert [a[1] for a in trained] == ["lora"] and again["meta"]["resumed"]["units_reused"] == len(UNITS) - 1
    assert not again.get("incomplete") and not (tmp_path / "res" / "partial" / f"{bet.name}.json").exists()
    assert len(again["cells"]) == len(first["cells"]) + again["config"]["eval"]["texts"]



def test_the_driver_sends_units_in_the_bets_order_as_room_and_dependencies_allow(monkeypatch):
    """Two slots; unit b waits on a1 but comes before a3 in the bet's order: it is sent as soon as a1 lands, ahead of
    a3 and a4 (not after the whole first wave). The quantise unit, last in the bet's order but hours
    long, is sent first. A fake Ray that finishes tasks in the order they were sent."""
    sent, done = [], {}

    class Ref:
        def __init__(self, key):
            self.key = key

    class FakeRay:
        class exceptions:
            RayError = RuntimeError

        def remote(self, *args):  # ray.remote(fn) -> the task; task.options(...).remote(bet, opts, key, ...) -> a ref
            if callable(args[0]):
                return self
            sent.append(args[2])
            return Ref(args[2])

        def options(self, **kw):
            return self

        def put(self, x):
            return x

        def cluster_resources(self):
            return {"CPU": 2}

        def wait(self, refs, num_returns):
            return refs[:1], refs[1:]

        def get(self, ref):
            return {"cells": [], "users": [], "seeds": [], "curves": {}, "wall_s": 0.0}

        def shutdown(self):
            pass

    fake = FakeRay()

    class Book:
        def put(self, key, value):
            done[key] = value

        def fail(self, key, error):
            raise AssertionError(key)

        def units(self):
            return dict(done)

    def pending():
        order = ["a1", "a2"] + (["b"] if "a1" in done else []) + ["a3", "a4", "quantize/q"]
        return [k for k in order if k not in done]

    monkeypatch.setattr(ray_units, "ray_module", lambda: fake)
    monkeypatch.setattr(ray_units, "start", lambda *a, **k: False)
    opts = Options(quick=True, corpora=CORPORA, ray="local")
    assert ray_units.dispatch(get_bet("scale_protocol"), opts, pending, Book()) == {}
    assert sent == ["quantize/q", "a1", "a2", "b", "a3", "a4"] and set(done) == set(sent)


def test_the_tuned_lrs_are_read_without_loading_the_base(tmp_path, monkeypatch):
    """The Ray driver enumerates the tuned arm's units: reading lr_sensitivity's committed lrs must compare
    fingerprints without loading the weights (it loaded a whole 0.5B base in the driver before)."""
    from sharedllm.bets.catalogue import current

    ctx = Context(get_bet("scale_protocol"), Options(quick=True, corpora=CORPORA, out=tmp_path, results=tmp_path))
    ctx._base, ctx._known = None, (ctx.base_name, ctx.fingerprint)  # as a named base converted here, not loaded
    monkeypatch.setattr("sharedllm.bets.context.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    lrs = current().module("lr_sensitivity").committed_tuned_lrs(ctx, same_base=False)
    assert set(lrs) == {"norm", "lora"} and "transferred" in ctx.notes["tuned_lr_source"]
