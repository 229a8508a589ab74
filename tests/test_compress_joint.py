"""Joint compression of a cohort of LoRAs (issue 32 item 2, `compress --joint`, quant/lora_joint.py): exact at a
joint rank covering the cohort, within the SVD bounds below it; core and shared files through the strict parsers,
load_adapted, eval, inspect and the server (PUT /v1/shared/SHA, then the core file as the user's adapter)."""
import hashlib
import json
import os
import struct

import pytest
import torch

from sharedllm import wire
from sharedllm.adapters import adapter_state
from sharedllm.adapters.lora import LoraConfig
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import Adapted, load_adapted
from sharedllm.quant import lora_joint
from sharedllm.quant.lora_rank import A_KEY, B_KEY
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, adapter_bytes, reference_score, text_ids

SITES = (("s1", 24, 40), ("s2", 16, 20))


@pytest.fixture(autouse=True)
def no_cached_bases():
    lora_joint._CACHE.clear()
    yield
    lora_joint._CACHE.clear()


def _cohort(n=3, r=4, alpha=8, seed=0, common=0.0):
    """n synthetic LoRAs on SITES (Adapted without a model); `common` mixes in a direction all users share."""
    g = torch.Generator().manual_seed(seed)
    shared = {site: (torch.randn(r, k, generator=g), torch.randn(m, r, generator=g)) for site, k, m in SITES}
    out = {}
    for u in range(n):
        named = {}
        for site, k, m in SITES:
            a = (1 - common) * torch.randn(r, k, generator=g) + common * shared[site][0]
            b = (1 - common) * torch.randn(m, r, generator=g) + common * shared[site][1]
            named[site + A_KEY], named[site + B_KEY] = a / k ** 0.5, 0.1 * b
        meta = {"format": wire.FORMAT, "format_version": 1, "method": "lora", "base_fingerprint": "f" * 64}
        out[f"u{u}"] = Adapted(model=None, params=named, method="lora", meta=meta,
                               config=LoraConfig(rank=r, alpha=alpha))
    return out


def _d(named, config, site):
    s = config.alpha / config.rank
    return s * named[site + B_KEY].double() @ named[site + A_KEY].double()


def _tail(m: torch.Tensor, k: int) -> float:
    return float(torch.linalg.svdvals(m)[k:].pow(2).sum())


def test_a_joint_rank_covering_the_cohort_reproduces_every_change():
    cohort = _cohort()
    bases, cores, errors = lora_joint.compress_cohort(cohort, 12)  # 3 users x rank 4
    for user, ad in cohort.items():
        assert errors[user] < 1e-7
        for site, _, _ in SITES:
            u, v = bases[site]
            d = _d(ad.params, ad.config, site)
            assert torch.allclose(u @ cores[user][site] @ v.t(), d, atol=1e-12, rtol=0)
            assert torch.allclose(u.t() @ u, torch.eye(12, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("iters", [0, 3])
def test_below_it_the_error_is_within_the_svd_bounds(k, iters):
    cohort = _cohort(common=0.5)
    bases, cores, errors = lora_joint.compress_cohort(cohort, k, iters)
    plain_bases, plain_cores, _ = lora_joint.compress_cohort(cohort, k, 0)

    def error(bs, cs, site, ds):
        u, v = bs[site]
        return sum(float((d - u @ cs[user][site] @ v.t()).pow(2).sum()) for user, d in zip(cohort, ds))

    for site, _, _ in SITES:
        ds = [_d(ad.params, ad.config, site) for ad in cohort.values()]
        err = error(bases, cores, site, ds)
        t_left, t_right = _tail(torch.cat(ds, 1), k), _tail(torch.cat([d.t() for d in ds], 1), k)
        assert max(t_left, t_right) * (1 - 1e-9) <= err  # no bases of rank k do better than either stack's tail
        assert err <= (t_left + t_right) * (1 + 1e-9)  # iters = 0's bound; the alternating steps only lower it
        assert err <= error(plain_bases, plain_cores, site, ds) * (1 + 1e-9)
        assert err > 0
    assert 0 < min(errors.values()) and max(errors.values()) < 1


def test_cohort_refusals():
    cohort = _cohort()
    for bad in (0, 13, 17):  # 13: over 3 users x rank 4; 17: over site s2's 16 columns too
        with pytest.raises(SharedLLMError, match="joint rank in 1..12"):
            lora_joint.check_cohort(cohort, bad)
    other = {**cohort, "odd": _cohort(1, r=2)["u0"]}
    with pytest.raises(SharedLLMError, match="odd: LoRA config .* differs"):
        lora_joint.check_cohort(other, 4)


def test_materialised_lora_is_u_c_vt_at_the_source_rank():
    cohort = _cohort(common=0.3)
    bases, cores, errors = lora_joint.compress_cohort(cohort, 6)
    shared = lora_joint.parse_shared(lora_joint.shared_bytes(bases, LoraConfig(), 6, "f" * 64, 3, 0), "s", "f" * 64)
    layout = [(f"{s}{key}", shape) for s, k, n in SITES for key, shape in ((A_KEY, (4, k)), (B_KEY, (n, 4)))]
    for user, ad in cohort.items():
        blob = lora_joint.core_bytes(ad, cores[user], shared.sha256, 6, errors[user])
        tensors, meta = wire.parse_file(blob, "core")
        assert meta["joint"]["rank"] == 6 and meta["method_config"]["rank"] == 4 and meta["shapes"] == [[6, 6]] * 2
        named = lora_joint.materialise(tensors, meta, layout, "core", shared)
        for site, _, _ in SITES:
            u, v = bases[site]
            want = u @ cores[user][site] @ v.t()
            got = _d(named, LoraConfig(), site)
            assert (got - want).norm() / want.norm() < 2e-3  # the cores are stored as float16


# ---- files on the tiny base: the CLI, load_adapted, eval, inspect -----------------------------------------------
@pytest.fixture
def cohort_dir(tiny, tmp_path):
    src = tmp_path / "loras"
    src.mkdir()
    for i, user in enumerate(("ann", "bob", "cy")):
        (src / f"{user}.safetensors").write_bytes(adapter_bytes(tiny, 10 + i, tmp_path, scale=0.05, method="lora"))
    return src


def _compress(src, out, k, capsys, *extra):
    assert main(["compress", "--joint", "--base", "tiny", "--adapters", str(src), "--out", str(out),
                 "--joint-rank", str(k), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _deltas(adapted):
    named = adapter_state(adapted.params)
    sites = [n[: -len(A_KEY)] for n in named if n.endswith(A_KEY)]
    return {s: _d(named, adapted.config, s) for s in sites}


def test_cli_end_to_end_exact_at_the_cohort_rank(tiny, cohort_dir, tmp_path, capsys):
    out = tmp_path / "joint"
    r = _compress(cohort_dir, out, 12, capsys)
    shared = out / lora_joint.shared_name(r["shared_sha256"])
    assert sorted(p.name for p in out.iterdir()) == sorted(["ann.safetensors", "bob.safetensors", "cy.safetensors",
                                                            shared.name])
    assert hashlib.sha256(shared.read_bytes()).hexdigest() == r["shared_sha256"] and r["shared"] == str(shared)
    assert r["bytes_215k"] == round(r["bytes_per_user"] * 215_000 + r["shared_bytes"])
    for user in ("ann", "bob", "cy"):
        core = out / f"{user}.safetensors"
        meta = wire.read_file(core)[1]
        assert meta["joint"]["shared_sha256"] == r["shared_sha256"] and meta["joint"]["rank"] == 12
        assert meta["joint"]["source_rank"] == 4 and meta["base_fingerprint"] == tiny.fingerprint
        assert r["per_user"][user]["bytes"] == core.stat().st_size < (cohort_dir / f"{user}.safetensors").stat().st_size
        assert r["per_user"][user]["rel_error"] < 1e-6
        raw, got = load_adapted(tiny, cohort_dir / f"{user}.safetensors"), load_adapted(tiny, core)
        assert got.config.rank == 4 and got.config.alpha == 8
        d_raw, d_got = _deltas(raw), _deltas(got)
        assert max(float((d_raw[s] - d_got[s]).norm() / d_raw[s].norm()) for s in d_raw) < 3e-3  # fp16 factors
    text = tmp_path / "u.txt"
    text.write_text("a user's words, the cat sat on the mat. " * 60)
    ppl = {}
    for name, path in (("raw", cohort_dir / "ann.safetensors"), ("joint", out / "ann.safetensors")):
        assert main(["eval", "--base", "tiny", "--adapter", str(path), "--text", str(text), "--window", "32",
                     "--json"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl["joint"] == pytest.approx(ppl["raw"], rel=1e-3)
    assert main(["inspect", str(out / "ann.safetensors"), "--base", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["inspect", str(shared), "--base", "tiny", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ok"] is True and got["kind"] == "shared bases" and got["rank"] == 12


def test_cli_small_rank_prints_bytes_and_the_projection(tiny, cohort_dir, tmp_path, capsys):
    assert main(["compress", "--joint", "--base", "tiny", "--adapters", str(cohort_dir), "--out",
                 str(tmp_path / "j4"), "--joint-rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "bytes per user" in text and "215,000 users:" in text and "relative error" in text
    r = _compress(cohort_dir, tmp_path / "j4b", 4, capsys)
    assert all(0 < x["rel_error"] < 1 for x in r["per_user"].values())
    assert r["bytes_per_user"] < 2000 < r["raw_bytes_per_user"]  # 14 cores of 4 x 4 in fp16 + the header
    for bad, msg in ((["--joint-rank", "13"], "joint rank in 1..12"), (["--adapter", "x"], "--joint takes"),
                     (["--joint-iters", "-1"], "--joint-iters")):
        assert main(["compress", "--joint", "--base", "tiny", "--adapters", str(cohort_dir), "--out",
                     str(tmp_path / "x"), *bad]) == 2
        assert msg in capsys.readouterr().err
    norm_dir = tmp_path / "norms"
    norm_dir.mkdir()
    (norm_dir / "n.safetensors").write_bytes(adapter_bytes(tiny, 1, tmp_path))
    assert main(["compress", "--joint", "--base", "tiny", "--adapters", str(norm_dir), "--out",
                 str(tmp_path / "y")]) == 2
    assert "compresses LoRA adapters" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_missing_or_wrong_shared_file_is_a_clear_refusal(tiny, cohort_dir, tmp_path, capsys):
    out, other = tmp_path / "joint", tmp_path / "other"
    r = _compress(cohort_dir, out, 8, capsys)
    r2 = _compress(cohort_dir, other, 4, capsys)
    shared, sha = out / lora_joint.shared_name(r["shared_sha256"]), r["shared_sha256"]
    core = out / "ann.safetensors"
    kept = shared.read_bytes()
    shared.unlink()
    lora_joint._CACHE.clear()
    with pytest.raises(SharedLLMError, match=f"{shared.name} \\(sha256 {sha}\\) are not in {out}") as e:
        load_adapted(tiny, core)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(core))
    text = tmp_path / "u.txt"
    text.write_text("the cat sat on the mat. " * 40)
    assert main(["eval", "--base", "tiny", "--adapter", str(core), "--text", str(text), "--window", "32"]) == 2
    err = capsys.readouterr().err
    assert sha in err and "Traceback" not in err
    shared.write_bytes((other / lora_joint.shared_name(r2["shared_sha256"])).read_bytes())  # another cohort's
    lora_joint._CACHE.clear()
    with pytest.raises(SharedLLMError, match=f"sha256 {r2['shared_sha256']}, but {core} needs .* {sha}"):
        load_adapted(tiny, core)
    shared.write_bytes(kept)
    assert load_adapted(tiny, core).config.rank == 4
    # bytes alone (no folder) find nothing unless a folder is given
    lora_joint._CACHE.clear()
    with pytest.raises(SharedLLMError, match="not given"):
        load_adapted(tiny, data=core.read_bytes(), source="c")
    assert load_adapted(tiny, data=core.read_bytes(), source="c", shared_dirs=[out]).config.rank == 4


def _core_meta_edit(path, **changes):
    tensors, meta = wire.parse_file(path.read_bytes(), "x")
    joint = {**meta["joint"], **changes.pop("joint", {})}
    return wire.adapter_bytes(dict(tensors), {**meta, "joint": joint, **changes})


JOINT_BAD = [({"shared_sha256": "A" * 64}, "64 lowercase hex"), ({"shared_sha256": "ab"}, "64 lowercase hex"),
             ({"shared_sha256": 5}, "64 lowercase hex"), ({"rank": 0}, "an integer in 1..64"),
             ({"rank": 65}, "an integer in 1..64"), ({"rank": True}, "an integer in 1..64"),
             ({"rank": "8"}, "an integer in 1..64"), ({"source_rank": 0}, "1..4096"),
             ({"source_alpha": -1}, "positive number"), ({"source_alpha": "8"}, "positive number"),
             ({"rel_error": 2}, r"number in \[0, 1\]"), ({"rel_error": None}, r"number in \[0, 1\]")]


def test_hostile_core_metadata_is_refused_by_the_parser(tiny, cohort_dir, tmp_path, capsys):
    out = tmp_path / "joint"
    _compress(cohort_dir, out, 8, capsys)
    core = out / "ann.safetensors"
    cases = [(_core_meta_edit(core, joint=j), msg) for j, msg in JOINT_BAD]
    tensors, meta = wire.parse_file(core.read_bytes(), "x")
    cases += [
        (wire.adapter_bytes(dict(tensors), {**meta, "joint": {**meta["joint"], "extra": 1}}), "exactly the fields"),
        (wire.adapter_bytes(dict(tensors), {**meta, "joint": [1]}), "exactly the fields"),
        (wire.adapter_bytes(dict(tensors), {**meta, "joint": {k: v for k, v in meta["joint"].items()
                                                              if k != "rank"}}), "exactly the fields"),
        (wire.adapter_bytes(dict(tensors), {**meta, "method_config": {**meta["method_config"], "rank": 8}}),
         "rank min"),
        (wire.adapter_bytes(dict(tensors), {k: v for k, v in meta.items() if k != "method_config"}), "rank min"),
        (wire.adapter_bytes(dict(tensors), {**{k: v for k, v in meta.items() if k != "method_config"},
                                            "method": "norm"}), "must be method 'lora'"),
        (wire.adapter_bytes(dict(tensors), {**meta, "shapes": [[16, 4]] + meta["shapes"][1:]}), "8 x 8 cores"),
    ]
    for i, (blob, msg) in enumerate(cases):
        with pytest.raises(SharedLLMError, match=msg) as e:
            wire.parse_file(blob, f"case{i}")
        assert "\n" not in str(e.value) and str(e.value).startswith(f"case{i}: ")
    # well-formed metadata that does not fit its shared file: refused when it is materialised
    fits = [(_core_meta_edit(core, joint={"source_rank": 8}, method_config={**meta["method_config"], "rank": 8}),
             "joint rank 8 of a rank-8 LoRA"),
            (_core_meta_edit(core, joint={"source_alpha": 16}), "alpha 16")]
    small = tmp_path / "small"
    r4 = _compress(cohort_dir, small, 4, capsys)
    fits.append((_core_meta_edit(core, joint={"shared_sha256": r4["shared_sha256"]}), "joint rank 8 .* rank 4"))
    dirs = [out, small]
    for blob, msg in fits:
        wire.parse_file(blob, "fits")  # the parser alone accepts it
        with pytest.raises(SharedLLMError, match=msg):
            load_adapted(tiny, data=blob, source="fits", shared_dirs=dirs)


def _shared_edit(data: bytes, meta_changes=None, values=None, dtype=None) -> bytes:
    tensors, meta = wire.parse_file(data, "s", expect=lora_joint.SHARED_FORMAT)
    flat = tensors["bases"] if values is None else values(tensors["bases"].clone())
    flat = flat if dtype is None else flat.to(dtype)
    return wire.adapter_bytes({"bases": flat}, {**meta, **(meta_changes or {})})


def test_hostile_shared_files_are_refused(tiny, cohort_dir, tmp_path, capsys):
    out = tmp_path / "joint"
    r = _compress(cohort_dir, out, 8, capsys)
    data = (out / lora_joint.shared_name(r["shared_sha256"])).read_bytes()
    meta = wire.parse_file(data, "s", expect=lora_joint.SHARED_FORMAT)[1]
    twice = lambda t: t * 2  # noqa: E731

    def nan(t):
        t[3] = float("nan")
        return t

    cases = [(_shared_edit(data, values=twice), "not orthonormal"), (_shared_edit(data, values=nan), "non-finite"),
             (_shared_edit(data, dtype=torch.float16), "expects one tensor 'bases' F32"),
             (_shared_edit(data, values=lambda t: t[:-1]), "expects one tensor 'bases' F32"),
             (_shared_edit(data, {"extra": 1}), "unknown \\['extra'\\]"),
             (_shared_edit(data, {"rank": 4}), "expects one tensor"),
             (_shared_edit(data, {"rank": 99}), "rank an integer in 1..64"),
             (_shared_edit(data, {"users": 0}), "users a positive integer"),
             (_shared_edit(data, {"format_version": True}), "format_version"),
             (_shared_edit(data, {"sites": meta["sites"][:1] * 2}), "distinct"),
             (_shared_edit(data, {"sites": [[s, n, 2] for s, n, _ in meta["sites"]]}), "N, K >= rank"),
             (_shared_edit(data, {"method_config": {"rank": "4"}}), "method_config field 'rank'"),
             (_shared_edit(data, {"base_fingerprint": "0" * 64}), "shared bases of base 0000"),
             (_shared_edit(data, {"format": "sharedllm-adapter"}), "no sharedllm-lora-bases metadata"),
             (data[:-4], "truncated"), (b"\x00" * 4, "not a safetensors file")]
    for i, (blob, msg) in enumerate(cases):
        with pytest.raises(SharedLLMError, match=msg) as e:
            lora_joint.parse_shared(blob, f"shared{i}", tiny.fingerprint)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"shared{i}: ")
    # through loading: a core file naming a hostile shared file by its (correct) sha256 is refused, never served
    hostile = cases[0][0]
    sha = hashlib.sha256(hostile).hexdigest()
    (out / lora_joint.shared_name(sha)).write_bytes(hostile)
    with pytest.raises(SharedLLMError, match="not orthonormal"):
        load_adapted(tiny, data=_core_meta_edit(out / "ann.safetensors", joint={"shared_sha256": sha}),
                     source="c", shared_dirs=[out])


# ---- the server -------------------------------------------------------------------------------------------------
def test_server_stores_the_shared_bases_then_serves_core_files(tiny, cohort_dir, tmp_path, monkeypatch, capsys):
    from .test_serve import TEXT, Server, auth

    out = tmp_path / "joint"
    r = _compress(cohort_dir, out, 8, capsys)
    sha = r["shared_sha256"]
    data = (out / lora_joint.shared_name(sha)).read_bytes()
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    s = Server(tiny, tmp_path / "store")
    try:
        put = lambda sha_, body, who=ADMIN: s.client.put(f"/v1/shared/{sha_}", content=body,  # noqa: E731
                                                        headers=auth(who))
        tokens = {u: s.user(u) for u in ("ann", "bob")}
        lora_joint._CACHE.clear()
        core = (out / "ann.safetensors").read_bytes()
        early = s.put("ann", tokens["ann"], core)  # before the shared bases: refused, naming them
        assert early.status_code == 400 and sha in early.json()["detail"]
        assert put(sha, data, tokens["ann"]).status_code == 403  # a user token cannot
        assert put(sha, data, "nope").status_code == 401
        assert put("0" * 64, data).status_code == 400 and "not " + "0" * 64 in put("0" * 64, data).json()["detail"]
        assert put("../../x", data).status_code in (400, 404)
        hostile = _shared_edit(data, values=lambda t: t * 2)
        bad = put(hashlib.sha256(hostile).hexdigest(), hostile)
        assert bad.status_code == 400 and "not orthonormal" in bad.json()["detail"]
        ok = put(sha, data)
        assert ok.status_code == 200 and ok.json() == {"sha256": sha, "bytes": len(data), "rank": 8, "sites": 14}
        stored = tmp_path / "store" / "shared" / f"{sha}.safetensors"
        assert stored.read_bytes() == data and (os.stat(stored).st_mode & 0o777) == 0o600
        assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]  # no temp file, no hostile file
        lora_joint._CACHE.clear()  # the server finds the bases in its store, not in a process cache
        for user in ("ann", "bob"):
            blob = (out / f"{user}.safetensors").read_bytes()
            up = s.put(user, tokens[user], blob)
            assert up.status_code == 200, up.text
            got = s.score(tokens[user]).json()["logprob"]
            alone = load_adapted(tiny, out / f"{user}.safetensors").model
            assert got == pytest.approx(reference_score(alone, text_ids(tiny, TEXT)), abs=1e-4)
        raw = reference_score(load_adapted(tiny, cohort_dir / "ann.safetensors").model, text_ids(tiny, TEXT))
        assert got != pytest.approx(raw, abs=1e-6)  # rank 8 < 12: really the compressed adapter, not the raw one
        s.router.max_shared_bytes = 100
        assert put(sha, data).status_code == 413
    finally:
        s.close()


def test_shared_file_header_is_bounded_like_every_file(tiny):
    """A shared file's header length is checked before anything is parsed (a hostile 8-byte prefix)."""
    with pytest.raises(SharedLLMError, match="header length"):
        lora_joint.parse_shared(struct.pack("<Q", 1 << 40) + b"{}", "h", tiny.fingerprint)
