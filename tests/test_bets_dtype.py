"""--dtype bf16: training and scoring under autocast, kept apart from fp32 (stamp, config, results folder, adapter
files, score cache), while fp32 stays exactly as it was."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sharedllm.bets import common
from sharedllm.bets.catalogue import current
from sharedllm.bets.harness import Options, get_bet, run_bet
from sharedllm.errors import SharedLLMError
from sharedllm.train import TrainConfig

from .conftest import CORPORA

STAMP_KEYS = {"bet", "version", "base_fingerprint", "train", "eval", "corpora"}  # the stamp before --dtype existed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Bet 37 quick in fp32 and in bf16, sharing one artefact folder (adapters and score cache)."""
    root = tmp_path_factory.mktemp("dtype")
    out = {}
    for dtype in ("fp32", "bf16"):
        opts = Options(quick=True, corpora=CORPORA, out=root / "out", results=root / dtype, dtype=dtype)
        out[dtype] = run_bet(get_bet("37"), opts)
    return root, out


def test_bf16_run_is_recorded_and_close_to_fp32(runs):
    root, r = runs
    assert r["bf16"]["config"]["dtype"] == "bf16" and "dtype" not in r["fp32"]["config"]
    nll = {d: [c["nll"] for c in r[d]["cells"]] for d in r}
    assert [c["tokens"] for c in r["bf16"]["cells"]] == [c["tokens"] for c in r["fp32"]["cells"]]
    assert nll["bf16"] != nll["fp32"]  # autocast took effect (the scores are not the cached fp32 ones)
    assert all(abs(b / f - 1) < 0.02 for b, f in zip(nll["bf16"], nll["fp32"]))
    curves = {d: r[d]["extras"]["loss_curves"] for d in r}
    assert curves["bf16"].keys() == curves["fp32"].keys() and curves["bf16"] != curves["fp32"]
    # adapters: a file of their own, marked in the sidecar and the file's metadata
    files = sorted(p.name for p in (root / "out" / "adapters").rglob("*.safetensors"))
    bf16 = [f for f in files if f.endswith("_bf16.safetensors")]
    assert len(bf16) == 3 and len(files) == 6  # norm, lora, full in each dtype
    side = next((root / "out" / "adapters").rglob("norm_*_bf16.json"))
    assert json.loads(side.read_text())["dtype"] == "bf16"
    assert "dtype" not in json.loads(next((root / "out" / "adapters").rglob("norm_*lr0.005.json")).read_text())
    keys = [k for f in (root / "out" / "scores").glob("*.json") for k in json.loads(f.read_text())]
    assert any(k.endswith("|bf16") for k in keys) and any(not k.endswith("|bf16") for k in keys)


def test_stamp_has_dtype_only_when_not_fp32(runs):
    from sharedllm.bets.context import Context

    root, _ = runs
    bet = get_bet("37")
    stamps = {d: Context(bet, Options(quick=True, corpora=CORPORA, out=root / "out", results=root / d,
                                      dtype=d))._stamp() for d in ("fp32", "bf16")}
    assert set(stamps["fp32"]) == STAMP_KEYS  # fp32 checkpoints (committed ones too) keep their stamp
    assert stamps["bf16"] == {**stamps["fp32"], "dtype": "bf16"}
    assert Context(bet, Options(quick=True, corpora=CORPORA, out=root / "out"))._stamp() == stamps["fp32"]
    for partial in current().results.rglob("partial/*.json"):  # committed checkpoints: the same stamp keys,
        stamp = json.loads(partial.read_text())["stamp"]  # plus dtype in a bf16 run's folder
        bf16 = partial.parent.parent.name.endswith("-bf16")
        frozen = {"frozen_bf16"} if stamp.get("frozen_bf16") is True and bf16 else set()  # --frozen-bf16 runs
        assert set(stamp) == STAMP_KEYS | ({"dtype"} if bf16 else set()) | frozen, partial
        assert stamp.get("dtype") == ("bf16" if bf16 else None), partial


def test_a_bf16_adapter_is_never_taken_for_an_fp32_one(tiny, tmp_path):
    cfg = TrainConfig(steps=1, batch=1, seq=16, lr=1e-3)
    tokens = torch.randint(0, 100, (400,))
    paths = {d: common.adapter_path(tiny, "u/x", "norm", cfg, "", tmp_path, d) for d in ("fp32", "bf16")}
    assert paths["fp32"] != paths["bf16"] and paths["bf16"].name.endswith("_bf16.safetensors")
    assert paths["fp32"] == common.adapter_path(tiny, "u/x", "norm", cfg, "", tmp_path)  # fp32 names as before
    made = common.ensure_adapter(tiny, "u/x", tokens, "norm", cfg, "", tmp_path, dtype="bf16")
    assert made == paths["bf16"] and common.sidecar(made)["dtype"] == "bf16"
    # a bf16-trained file found where the fp32 one belongs (copied, renamed) is trained again, not reused
    paths["fp32"].write_bytes(made.read_bytes())
    paths["fp32"].with_suffix(".json").write_text(made.with_suffix(".json").read_text())
    again = common.ensure_adapter(tiny, "u/x", tokens, "norm", cfg, "", tmp_path)
    assert again == paths["fp32"] and "dtype" not in common.sidecar(again)


def test_autocast_keeps_trainable_parameters_fp32(tiny):
    from sharedllm.personalise import personalise

    with common.autocast("bf16"):
        adapted = personalise(tiny, torch.randint(0, 100, (400,)), "lora", TrainConfig(steps=2, batch=1, seq=16))
    assert all(p.dtype == torch.float32 for p in adapted.params.values())
    assert all(isinstance(x, float) for x in adapted.result.losses)
    assert isinstance(common.autocast("fp32"), contextlib.nullcontext)


def test_dtype_option_travels(tmp_path):
    from sharedllm.bets.ray_units import _options, _plain
    from sharedllm.cli import build_parser
    from sharedllm.commands.bet import options_from

    parser, _ = build_parser()
    args = parser.parse_args(["bet", "37", "--quick", "--dtype", "bf16", "--results", str(tmp_path)])
    opts = options_from(args)
    assert opts.dtype == "bf16" and _options(json.dumps(_plain(opts))).dtype == "bf16"
    assert options_from(parser.parse_args(["bet", "37"])).dtype == "fp32"
    with pytest.raises(SystemExit):
        parser.parse_args(["bet", "37", "--dtype", "fp16"])
    with pytest.raises(SharedLLMError, match="--dtype"):
        Options(dtype="fp16")
    results = current().results  # a bf16 run never shares a results folder (result, checkpoint) with fp32
    assert Options(quick=True, dtype="bf16").result_dir() == results / "quick" / "bf16"
    assert Options(base="some/dir/base-x", dtype="bf16").result_dir() == results / "other" / "base-x-bf16"
    assert Options(base="some/dir/base-x").result_dir() == results / "other" / "base-x"
    assert Options(dtype="bf16").result_dir().parent == results / "other"


def test_scale_table_marks_bf16_runs(tmp_path):
    scale = current().module(current().bets["scale_protocol"])
    part = tmp_path / "other" / "qwen2.5-coder-0.5b-bf16" / "partial" / "scale_protocol.json"
    part.parent.mkdir(parents=True)
    part.write_text(json.dumps({"stamp": {"dtype": "bf16"}, "units": {}}))
    assert scale.scale_runs(tmp_path) == [("qwen2.5-coder-0.5b", "partial: 0 units (bf16)", [], "bf16", True)]


def test_holding_the_matmul_weights_in_bf16_trains_the_same_norm_adapter():
    """--frozen-bf16: autocast casts each fp32 weight to bf16 at every matmul, so weights held in bf16 give the same
    norm adapter bit for bit; LoRA only differs by its random A init rounded to bf16; full fine-tuning is refused."""
    from sharedllm.base import load_base
    from sharedllm.personalise import personalise
    from sharedllm.train import hold_frozen_in_bf16

    fp32, held = load_base("tiny"), load_base("tiny")
    head = held.model.get_output_embeddings().weight
    assert hold_frozen_in_bf16(held.model) > 0 and head.dtype == torch.float32
    layer = held.model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16 and layer.input_layernorm.weight.dtype == torch.float32
    tokens = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=4, batch=2, seq=32, lr=1e-2)
    a, b = (personalise(base, tokens, "norm", cfg, dtype="bf16").params for base in (fp32, held))
    untrained = dict(fp32.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], untrained[k]) for k in a)
    a, b = (personalise(base, tokens, "lora", cfg, dtype="bf16").params for base in (fp32, held))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05
    with pytest.raises(SharedLLMError, match="full would train .* held in torch.bfloat16"):
        personalise(held, tokens, "full", cfg, dtype="bf16")


def test_frozen_bf16_is_refused_without_bf16_or_with_full_ft(tmp_path):
    from sharedllm.cli import build_parser
    from sharedllm.commands.bet import options_from

    parser, _ = build_parser()
    args = parser.parse_args(["bet", "scale_protocol", "--dtype", "bf16", "--frozen-bf16", "--results", str(tmp_path)])
    from sharedllm.bets.ray_units import _options, _plain

    assert _options(json.dumps(_plain(options_from(args)))).frozen_bf16  # travels to the Ray workers
    for bad in (["--frozen-bf16"], ["--dtype", "bf16", "--frozen-bf16", "--full-ft"]):
        with pytest.raises(SharedLLMError, match="--frozen-bf16 needs --dtype bf16"):
            options_from(parser.parse_args(["bet", "scale_protocol", *bad]))
