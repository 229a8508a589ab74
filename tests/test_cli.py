"""The real CLI end to end on the tiny base (subprocess for one run, in-process for the rest)."""
import json
import subprocess
import sys

import pytest

from sharedllm.cli import main


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def test_adapt_eval_inspect_round_trip(capsys, user_text, tmp_path):
    out = tmp_path / "u.safetensors"
    code, r = run_json(capsys, "adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny",
                       "--steps", "20", "--seq", "64", "--lr", "1e-2", "--window", "64")
    assert code == 0
    assert {"ppl_before", "ppl_after", "params", "bytes", "wall_s", "steps", "window"} <= set(r)
    assert r["steps"] == 20 and r["params"] == 320 and r["bytes"] == out.stat().st_size and r["window"] == 64
    assert r["ppl_after"] < r["ppl_before"], "20 steps at lr 1e-2 on repetitive text must lower held-out ppl"
    code, e = run_json(capsys, "eval", "--text", str(user_text), "--adapter", str(out), "--base", "tiny",
                       "--window", "64")
    assert code == 0 and e["ppl"] == pytest.approx(r["ppl_after"], rel=1e-3)
    assert {"ppl", "bits_per_byte", "tokens", "window"} <= set(e)
    code, i = run_json(capsys, "inspect", str(out))
    assert i["kind"] == "adapter" and i["method"] == "norm" and i["params"] == 320 and i["dtype"] == "F16"
    assert i["base_fingerprint"] == r["base_fingerprint"] and len(i["fingerprint"]) == 64


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--text", "/nonexistent/user.txt", "--base", "tiny"], "no such file"),
    (["inspect", "/nonexistent.safetensors"], "no such file"),
    (["adapt", "--text", "USER", "--out", "x.safetensors", "--base", "tiny", "--method", "magic"], "unknown adapter"),
    (["eval", "--text", "USER", "--base", "/nonexistent/base"], "no such file or directory"),
])
def test_expected_mistakes_give_one_clear_line(capsys, user_text, argv, needle):
    argv = [str(user_text) if a == "USER" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_command_line_entry_point_runs(user_text, tmp_path):
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run([sys.executable, "-m", "sharedllm.cli", "adapt", "--text", str(user_text), "--out", str(out),
                           "--base", "tiny", "--steps", "2", "--seq", "32", "--window", "32"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "held-out token ppl" in proc.stdout and out.is_file()
    bad = subprocess.run([sys.executable, "-m", "sharedllm.cli", "inspect", str(user_text)],
                         capture_output=True, text=True, timeout=60)
    # inspect shows what it can of a refused file, marked INVALID, and exits 1 (issue 10)
    assert bad.returncode == 1 and "INVALID" in bad.stdout and "not a safetensors" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("method", ["norm", "lora"])
def test_export_loads_back_in_transformers_and_peft(capsys, tiny, method, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sharedllm.personalise import new_adapter, save_adapted

    adapted = new_adapter(tiny, method)
    with torch.no_grad():
        for p in adapted.params.values():
            p.add_(0.05 * torch.randn_like(p))
    path = save_adapted(adapted, tmp_path / "a.safetensors", tiny, dtype=torch.float32)
    out = tmp_path / "export"
    assert main(["export", "--adapter", str(path), "--out", str(out), "--base", "tiny"]) == 0
    if method == "lora":
        from peft import PeftModel

        import copy
        model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(out))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, adapted.model(input_ids=ids).logits, atol=1e-5)
    assert main(["export", "--adapter", str(path), "--out", str(out), "--base", "tiny"]) == 2


def test_demo_compares_three_methods_at_the_recommended_lrs_and_norm_at_the_catalogues(capsys, tmp_path):
    from sharedllm import wire
    from sharedllm.commands import demo

    code, r = run_json(capsys, "demo", "--base", "tiny", "--steps", "2", "--eval-tokens", "256",
                       "--out-dir", str(tmp_path))
    assert code == 0
    assert [(row["method"], row["recipe"], row["lr"]) for row in r["rows"]] == [
        ("base (no adapter)", "-", 0.0), ("norm", "catalogue", 5e-5), ("norm", "recommended", 2e-3),
        ("lora", "recommended", 1e-3), ("full", "recommended", 5e-5)]
    sizes = {row["method"]: row["bytes"] for row in r["rows"]}
    assert 0 < sizes["norm"] < sizes["lora"] < sizes["full"]
    assert all(row["personal_ppl"] > 1 and row["general_ppl"] > 1 for row in r["rows"])
    base = r["rows"][0]
    assert all(row["general_vs_base"] == pytest.approx(row["general_ppl"] / base["general_ppl"]) for row in r["rows"])
    assert set(r["recipes"]) == {"recommended", "catalogue"} and "lr_sensitivity" in r["recipes"]["recommended"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors", "lora.safetensors",
                                                          "norm-catalogue.safetensors", "norm.safetensors"]
    assert wire.read_file(tmp_path / "norm.safetensors")[1]["train"]["lr"] == 2e-3
    table = demo.render(r)
    assert "catalogue" in table and "recommended" in table and "general ppl" in table


def test_help_of_the_command_and_every_subcommand_exits_zero():
    from sharedllm.cli import SUBCOMMANDS

    for argv in [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]]:
        proc = subprocess.run([sys.executable, "-m", "sharedllm.cli", *argv], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr, argv
    bare = subprocess.run([sys.executable, "-m", "sharedllm.cli"], capture_output=True, text=True, timeout=600)
    assert bare.returncode == 2 and "usage:" in bare.stdout and "Traceback" not in bare.stderr


def _texts(tmp_path, n):
    from tests.conftest import english

    paths = []
    for i in range(n):
        p = tmp_path / f"user{i}.txt"
        p.write_text(english(6000, seed=i))
        paths.append(p)
    return paths


@pytest.mark.parametrize("method, lr", [("norm", "1e-2"), ("lora", "1e-3")])
def test_adapt_several_texts_writes_one_adapter_per_user_equal_to_adapting_alone(capsys, tmp_path, method, lr):
    a, b = _texts(tmp_path, 2)
    common = ["--base", "tiny", "--steps", "6", "--seq", "64", "--lr", lr, "--window", "64", "--method", method]
    code, r = run_json(capsys, "adapt", "--text", str(a), "--text", str(b), "--out-dir", str(tmp_path / "out"),
                       *common)
    assert code == 0 and [u["user"] for u in r["users"]] == ["user0", "user1"]
    code, alone = run_json(capsys, "adapt", "--text", str(b), "--out", str(tmp_path / "b.safetensors"), *common)
    fleet_b = r["users"][1]
    assert fleet_b["ppl_after"] == pytest.approx(alone["ppl_after"], rel=1e-4) and fleet_b["ppl_after"] < fleet_b["ppl_before"]
    code, i = run_json(capsys, "inspect", fleet_b["out"])
    assert i["method"] == method and i["base_fingerprint"] == r["base_fingerprint"]
    assert i["params"] == (320 if method == "norm" else alone["params"])


def _file_meta(path):
    from sharedllm import wire

    return wire.read_file(path)[1]  # the strict parser: refuses anything that is not a valid adapter file


def test_adapt_dtype_bf16_writes_valid_adapters_marked_bf16(capsys, tmp_path, tiny, monkeypatch):
    import torch

    from sharedllm import train
    from sharedllm.commands import args as cli_args
    from sharedllm.personalise import load_adapted

    held = []  # bytes freed by each call the command makes
    monkeypatch.setattr(cli_args, "hold_frozen_in_bf16", lambda model: held.append(train.hold_frozen_in_bf16(model)))

    a, b = _texts(tmp_path, 2)
    common = ["--base", "tiny", "--steps", "6", "--seq", "64", "--lr", "1e-2", "--window", "64"]
    code, r = run_json(capsys, "adapt", "--text", str(a), "--text", str(b), "--out-dir", str(tmp_path / "bf16"),
                       "--dtype", "bf16", *common)
    assert code == 0 and r["dtype"] == "bf16" and [u["user"] for u in r["users"]] == ["user0", "user1"]
    code, fp32 = run_json(capsys, "adapt", "--text", str(a), "--text", str(b), "--out-dir", str(tmp_path / "fp32"),
                          *common)
    assert code == 0 and fp32["dtype"] == "fp32"
    for u, f in zip(r["users"], fp32["users"]):
        meta = _file_meta(u["out"])
        assert meta["compute_dtype"] == "bf16" and meta["train"]["dtype"] == "bf16" and meta["train"]["steps"] == 6
        assert u["ppl_after"] < u["ppl_before"]
        code, i = run_json(capsys, "inspect", u["out"], "--base", "tiny")
        assert code == 0 and i["ok"] and i["compute_dtype"] == "bf16"
        assert "compute_dtype" not in _file_meta(f["out"]) and "dtype" not in _file_meta(f["out"])["train"]
        bf16, plain = load_adapted(tiny, u["out"]), load_adapted(tiny, f["out"])
        # autocast took effect: other gains (fp16 in the file: 6 steps move them ~1 fp16 ulp apart) and other scores
        assert any(not torch.equal(bf16.params[n], plain.params[n]) for n in bf16.params)
        assert u["ppl_before"] != f["ppl_before"]
        assert all(torch.isfinite(p).all() for p in bf16.params.values())
    # one text: the same flag, the same record
    out = tmp_path / "one.safetensors"
    code, one = run_json(capsys, "adapt", "--text", str(a), "--out", str(out), "--dtype", "bf16", *common)
    assert code == 0 and one["dtype"] == "bf16" and _file_meta(out)["compute_dtype"] == "bf16"
    assert one["ppl_after"] == pytest.approx(r["users"][0]["ppl_after"], rel=1e-3)  # alone = in the fleet, in bf16
    # the command held the tiny base's matmul weights in bf16: the same gains as autocast over fp32 weights
    from sharedllm.data import load_user
    from sharedllm.personalise import personalise
    from sharedllm.train import TrainConfig

    ref = personalise(tiny, load_user(str(a), tiny.tokenizer).train, "norm",
                      TrainConfig(steps=6, seq=64, lr=1e-2), dtype="bf16")
    got = load_adapted(tiny, out).params
    assert all(torch.equal(got[n], ref.params[n].detach().half().float()) for n in got)
    assert tiny.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the fixture's base untouched
    assert len(held) == 2 and all(freed > 0 for freed in held)  # the fleet run and the one-text run; not fp32
    with pytest.raises(SystemExit):
        main(["adapt", "--text", str(a), "--out", str(out), "--dtype", "fp16", *common])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_adapt_manifest_gives_names_and_per_user_learning_rates(capsys, tmp_path):
    a, b = _texts(tmp_path, 2)
    manifest = tmp_path / "users.json"
    manifest.write_text(json.dumps({"ann": a.name, "bob": {"text": b.name, "lr": 0.0}}))
    code, r = run_json(capsys, "adapt", "--manifest", str(manifest), "--out-dir", str(tmp_path / "out"),
                       "--base", "tiny", "--steps", "3", "--seq", "64", "--lr", "1e-2", "--window", "64")
    assert code == 0 and {u["user"]: u["lr"] for u in r["users"]} == {"ann": 1e-2, "bob": 0.0}
    bob = r["users"][1]
    assert bob["ppl_after"] == pytest.approx(bob["ppl_before"], rel=1e-3), "lr 0 must leave bob at the base"
    assert (tmp_path / "out" / "ann.safetensors").is_file() and (tmp_path / "out" / "bob.safetensors").is_file()


@pytest.mark.parametrize("extra, manifest, needle", [
    (["--out", "x.safetensors"], None, "give --out-dir DIR"),
    (["--out-dir", "o", "--method", "full"], None, "per-row kernel"),
    (["--out-dir", "o"], "ann user0.txt\nann user1.txt\n", "appears twice"),
    (["--out-dir", "o"], "../evil user0.txt\n", "not a safe file name"),
    (["--out-dir", "o"], '{"ann": {"text": "user0.txt", "lr": "fast"}}', "give a number"),
])
def test_adapt_many_mistakes_give_one_clear_line(capsys, tmp_path, extra, manifest, needle):
    a, b = _texts(tmp_path, 2)
    argv = ["adapt", "--base", "tiny", *extra]
    if manifest:
        (tmp_path / "m.txt").write_text(manifest)
        argv += ["--manifest", str(tmp_path / "m.txt")]
    else:
        argv += ["--text", str(a), "--text", str(b)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
