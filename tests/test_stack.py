"""Hierarchical adapters (sharedllm.stack): a group LoRA on a cluster's pooled text, each user's norm adapter trained
on top (`adapt --on-top`), bound to the base and the group file; loading, eval and the server (the group PUT to
/v1/shared/SHA, served as its own per-row part beside the user's) all give what the merged base gives."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from sharedllm import stack, wire
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, personalise, save_adapted, stacked_base
from sharedllm.store import ADMIN_ENV
from sharedllm.train import TrainConfig

from .conftest import CORPORA
from .serve_kit import ADMIN, reference_score, text_ids

USERS = ["programmer/cpython_asyncio.txt", "programmer/requests.txt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, group file, two users' parts on top of it), on the tiny base, a few steps each."""
    from sharedllm.base import load_base
    from sharedllm.data import load_user

    tiny, d = load_base("tiny"), tmp_path_factory.mktemp("stack")
    pooled = torch.cat([load_user(CORPORA / u, tiny.tokenizer).train for u in USERS])
    group = personalise(tiny, pooled, "lora", TrainConfig(steps=4, lr=1e-2, seq=32))
    group_path = save_adapted(group, d / "group.safetensors", tiny)
    for u in USERS:
        assert main(["adapt", "--base", "tiny", "--text", str(CORPORA / u), "--out", str(d / f"{u.split('/')[1]}"),
                     "--on-top", str(group_path), "--method", "norm", "--steps", "4", "--seq", "32", "--lr", "5e-2",
                     "--eval-tokens", "64", "--window", "32", "-q"]) == 0
    return d, group_path, [d / u.split("/")[1] for u in USERS]


def merged_logits(tiny, group_path, user_path, ids):
    """The reference, by hand: the group's B A merged into a copy of the base (stacked_base), the user's gains
    written into its RMSNorms."""
    stacked = stacked_base(tiny, group_path.read_bytes(), "g")
    gains = load_adapted(tiny, user_path).params
    modules = dict(stacked.model.named_modules())
    with torch.no_grad():
        for name, value in gains.items():
            modules[name.removesuffix(".weight")].weight.copy_(value)
        return stacked.model(input_ids=torch.tensor([ids])).logits


def test_the_part_is_bound_to_the_base_and_the_group(tiny, trained):
    d, group_path, users = trained
    _, meta = wire.read_file(users[0])
    sha = hashlib.sha256(group_path.read_bytes()).hexdigest()
    assert meta["on_top"] == {"sha256": sha, "file": "group.safetensors", "method": "lora"}
    assert meta["base_fingerprint"] == stack.stacked_fingerprint(tiny.fingerprint, sha) != tiny.fingerprint
    ids = text_ids(tiny, "def parse(text):\n    return text.split()\n")
    alone = load_adapted(tiny, users[0]).model  # finds the group beside it
    with torch.no_grad():
        got = alone(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(got, merged_logits(tiny, group_path, users[0], ids), atol=1e-5)
    with torch.no_grad():
        plain = tiny.model(input_ids=torch.tensor([ids])).logits
    assert not torch.allclose(got, plain, atol=1e-3)  # the group and the part really change the base


def test_missing_or_changed_group_is_refused_by_name(tiny, trained, tmp_path):
    d, group_path, users = trained
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(users[0].read_bytes())
    with pytest.raises(SharedLLMError, match="group adapter 'group.safetensors'.*not beside it"):
        load_adapted(tiny, lone)
    (tmp_path / "group.safetensors").write_bytes(group_path.read_bytes()[:-2] + b"\x00\x00")  # another file
    with pytest.raises(SharedLLMError, match="not beside it"):
        load_adapted(tiny, lone)
    norm = save_adapted(new_adapter(tiny, "norm"), tmp_path / "norm.safetensors", tiny).read_bytes()
    with pytest.raises(SharedLLMError, match="must be a LoRA"):
        stacked_base(tiny, norm, "n")  # a norm file is no group
    with pytest.raises(SharedLLMError, match="one level"):
        stacked_base(tiny, users[1].read_bytes(), "u")  # nor is a part on top of a group


@pytest.mark.parametrize("value", [{"sha256": "x" * 64, "file": "g", "method": "lora"},
                                   {"sha256": "a" * 64, "file": "../g", "method": "lora"},
                                   {"sha256": "a" * 64, "file": "g", "method": "nope"},
                                   {"sha256": "a" * 64, "file": "g"}, "a" * 64])
def test_the_on_top_field_is_parsed_strictly(trained, value):
    _, _, users = trained
    tensors, meta = wire.read_file(users[0])
    blob = wire.adapter_bytes({"adapter": tensors["adapter"]}, {**meta, "on_top": value})
    with pytest.raises(SharedLLMError, match="metadata field 'on_top'"):
        wire.parse_file(blob, "f")


def check_parts(tiny, group_path, folder, users) -> None:
    """Each user's part in `folder` is bound to the base and the group, finds the group kept beside it, and gives
    what the merged base with its gains gives."""
    sha = hashlib.sha256(group_path.read_bytes()).hexdigest()
    ids = text_ids(tiny, "def parse(text):\n    return text.split()\n")
    for user in users:
        path = folder / f"{user}.safetensors"
        _, meta = wire.read_file(path)
        assert meta["on_top"]["sha256"] == sha and meta["user"] == user
        assert meta["base_fingerprint"] == stack.stacked_fingerprint(tiny.fingerprint, sha)
        with torch.no_grad():
            got = load_adapted(tiny, path).model(input_ids=torch.tensor([ids])).logits
        assert torch.allclose(got, merged_logits(tiny, group_path, path, ids), atol=1e-5)
    assert (folder / group_path.name).read_bytes() == group_path.read_bytes()  # kept beside the parts


def test_many_users_train_their_parts_on_top_in_one_pass(tiny, trained, tmp_path, capsys):
    d, group_path, _ = trained
    out = tmp_path / "D"
    capsys.readouterr()
    assert main(["adapt", "--base", "tiny", *[x for u in USERS for x in ("--text", str(CORPORA / u))],
                 "--out-dir", str(out), "--on-top", str(group_path), "--method", "norm", "--steps", "3", "--seq", "32",
                 "--lr", "5e-2", "--eval-tokens", "64", "--window", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["on_top"]["file"] == "group.safetensors" and len(r["users"]) == 2
    check_parts(tiny, group_path, out, ["cpython_asyncio", "requests"])


def test_a_fleet_on_ray_trains_on_top_and_puts_the_group_in_the_store(tiny, trained, tmp_path, monkeypatch):
    """With --ray (an in-process stand-in) and --store: the group goes once to the object store and to the
    store's shared/, every part lands bound to it, the server serves them, and a rerun skips them."""
    from sharedllm.bets import ray_units
    from sharedllm.commands import adapt_ray
    from sharedllm.store import AdapterStore

    from .test_adapt_ray import InlineRay, run_adapt
    from .test_serve import TEXT, Server

    _, group_path, _ = trained
    fake = InlineRay()
    monkeypatch.setattr(ray_units, "ray_module", lambda: fake)
    monkeypatch.setattr(ray_units, "start", lambda *a, **k: False)
    (tmp_path / "users.json").write_text(json.dumps({"ann": str(CORPORA / USERS[0]), "bob": str(CORPORA / USERS[1])}))
    r = run_adapt(tmp_path, "--on-top", str(group_path), "--store", str(tmp_path / "S"), "--seq", "32",
                  "--window", "32")
    assert r["ok"] and r["trained"] == 2, r["failures"]
    assert "on top of group group.safetensors" in adapt_ray.render_ray(r) and r["on_top"]["file"] == "group.safetensors"
    check_parts(tiny, group_path, tmp_path / "D", ["ann", "bob"])
    sha = hashlib.sha256(group_path.read_bytes()).hexdigest()
    store = AdapterStore(tmp_path / "S")
    assert (store.shared / f"{sha}.safetensors").read_bytes() == group_path.read_bytes()
    assert store.get("ann").sha256 == hashlib.sha256((tmp_path / "D" / "ann.safetensors").read_bytes()).hexdigest()
    store.close()
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "S")
    try:
        row = s.router.row_for("ann")
        assert row.parts[0].method == "lora"  # the group from the store's shared/, beside ann's gains
        want = reference_score(load_adapted(tiny, tmp_path / "D" / "ann.safetensors").model, text_ids(tiny, TEXT))
        lines = (tmp_path / "D" / "store_tokens.jsonl").read_text().splitlines()
        token = next(x["token"] for x in map(json.loads, lines) if x["user"] == "ann")
        assert s.score(token).json()["logprob"] == pytest.approx(want, abs=1e-4)
    finally:
        s.close()
    again = run_adapt(tmp_path, "--on-top", str(group_path), "--store", str(tmp_path / "S"), "--seq", "32",
                      "--window", "32")
    assert again["ok"] and again["skipped"] == 2


def test_a_fleet_on_ray_refuses_a_group_of_another_base(tiny, trained, tmp_path, monkeypatch):
    from sharedllm.bets import ray_units

    from .test_adapt_ray import InlineRay, run_adapt

    _, group_path, users = trained
    monkeypatch.setattr(ray_units, "ray_module", lambda: InlineRay())
    monkeypatch.setattr(ray_units, "start", lambda *a, **k: False)
    (tmp_path / "users.json").write_text(json.dumps({"ann": str(CORPORA / USERS[0])}))
    with pytest.raises(SharedLLMError, match="one level"):
        run_adapt(tmp_path, "--on-top", str(users[0]))  # a part is no group
    tensors, meta = wire.read_file(group_path)
    other = tmp_path / "other_base_group.safetensors"
    other.write_bytes(wire.adapter_bytes(tensors, {**meta, "base_fingerprint": "0" * 64}))
    with pytest.raises(SharedLLMError, match="other_base_group.safetensors: adapter was trained on base 0000"):
        run_adapt(tmp_path, "--on-top", str(other))
    assert not (tmp_path / "D" / "ann.safetensors").exists()


def test_cli_refuses_on_top_where_it_does_not_apply(tmp_path, trained, capsys):
    _, group_path, _ = trained
    text = str(CORPORA / USERS[0])
    assert main(["adapt", "--base", "tiny", "--text", text, "--out", str(tmp_path / "x"), "--method", "auto",
                 "--on-top", str(group_path)]) == 2
    assert main(["adapt", "--base", "tiny", "--text", text, "--out", str(tmp_path / "x"),
                 "--on-top", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "give --method" in err and "no such file" in err
    assert "Traceback" not in err


def test_server_serves_the_group_and_each_part_as_one_row(tiny, trained, tmp_path, monkeypatch):
    from .test_serve import TEXT, Server, auth

    d, group_path, users = trained
    group, sha = group_path.read_bytes(), hashlib.sha256(group_path.read_bytes()).hexdigest()
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store")
    try:
        tokens = {u.name: s.user(u.name.replace(".txt", "")) for u in users}
        first = users[0]
        early = s.put(first.name.replace(".txt", ""), tokens[first.name], first.read_bytes())
        assert early.status_code == 400 and sha[:16] in early.json()["detail"]  # the group is not there yet
        put = lambda body, who=ADMIN: s.client.put(f"/v1/shared/{sha}", content=body, headers=auth(who))  # noqa
        assert put(group, tokens[first.name]).status_code == 403
        assert put(users[1].read_bytes()).status_code == 400  # a norm file is no group (and not this sha)
        ok = put(group)
        assert ok.status_code == 200 and ok.json() == {"sha256": sha, "bytes": len(group), "group": "lora",
                                                       "params": wire.read_file(group_path)[1]["params"]}
        for u in users:
            up = s.put(u.name.replace(".txt", ""), tokens[u.name], u.read_bytes())
            assert up.status_code == 200, up.text
            got = s.score(tokens[u.name]).json()["logprob"]
            want = reference_score(load_adapted(tiny, u).model, text_ids(tiny, TEXT))
            assert got == pytest.approx(want, abs=1e-4)
        parts = [s.router.row_for(u.name.replace(".txt", "")).parts[0] for u in users]
        assert parts[0] is parts[1] and parts[0].method == "lora"  # one packed group for all its users
        # a stacked row shares a batch with a plain base row and gives what it gives alone
        rows = [s.router.row_for(users[0].name.replace(".txt", "")), s.router.model.base_row]
        ids = torch.tensor([text_ids(tiny, TEXT)] * 2)
        logits = s.router.model.forward(ids, rows).logits
        with torch.no_grad():
            base_alone = tiny.model(input_ids=ids[:1]).logits
        assert torch.allclose(logits[0], merged_logits(tiny, group_path, users[0], ids[0].tolist())[0], atol=1e-4)
        assert torch.allclose(logits[1], base_alone[0], atol=1e-4)
    finally:
        s.close()


def test_a_stacked_row_needs_parts_of_different_methods(tiny):
    from sharedllm.adapters.rows import RowModel

    rm = RowModel(tiny)
    with pytest.raises(SharedLLMError, match="different methods"):
        rm.stacked([rm.base_row, rm.base_row])
    assert json.dumps(stack.ON_TOP) == '"on_top"'


def test_inspect_and_eval_find_the_group_beside_the_part(trained, capsys):
    d, group_path, users = trained
    capsys.readouterr()
    assert main(["inspect", str(users[0]), "--base", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "on_top" in out and "group.safetensors" in out
    assert main(["eval", "--base", "tiny", "--text", str(CORPORA / USERS[0]), "--adapter", str(users[0]),
                 "--window", "32", "--eval-tokens", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl"] > 0 and got["adapter"] == str(users[0])
