"""A result's `seeds` are the seeds its adapters were trained (or taken) with: reading the training budget
(`Context.train_config`, as `config()` and the checkpoint stamp do) records none (issue 31, item 6)."""
from __future__ import annotations

from sharedllm.bets.context import Context
from sharedllm.bets.harness import Options, get_bet

from .conftest import CORPORA


def test_reading_the_training_budget_records_no_seed(tmp_path):
    ctx = Context(get_bet("37"), Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path))
    ctx.train_config(7)
    ctx.train_config(3, lr=1e-3)
    assert ctx.config()["seeds"] == []  # no adapter trained: no seed, not even config()'s own seed 0
    ctx.adapter("programmer/cpython_asyncio", "norm", seed=1)
    assert ctx.config()["seeds"] == [1]  # the seed it trained with, and only that one


def test_a_unit_records_the_seeds_it_trained_with(tmp_path):
    ctx = Context(get_bet("37"), Options(quick=True, corpora=CORPORA, out=tmp_path / "out", results=tmp_path))
    ctx.unit("u", lambda: ctx.train_config(5) and [] or [])  # reads a budget, trains nothing
    ctx.unit("v", lambda: [{"path": str(ctx.adapter("programmer/cpython_asyncio", "norm", seed=2))}])
    units = ctx.checkpoint.units()
    assert units["u"]["seeds"] == [] and units["v"]["seeds"] == [2]
