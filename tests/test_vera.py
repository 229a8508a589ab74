"""vera (VeRA via PEFT): shared projections regenerated from the config's seed and never saved per user, a fresh
adapter is the base, the CLI trains it with its options, and its PEFT export loads back to the same logits.
(The mixed-batch, decode and fleet exactness tests are in tests/test_rows.py; the generic battery in test_adapters.)"""
import copy
import json

import pytest
import torch

from sharedllm import wire
from sharedllm.adapters import get_method
from sharedllm.adapters.rows import RowModel
from sharedllm.adapters.vera import VeraConfig, projections
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, save_adapted

from .serve_kit import mixed_and_alone, moved


def test_the_shared_projections_are_peft_s_and_are_not_in_the_file(tiny, tmp_path):
    cfg = VeraConfig(rank=8, targets=("q_proj", "down_proj"), seed=7)
    adapted = new_adapter(tiny, "vera", config=cfg)
    peft_a, peft_b = adapted.model.base_model.vera_A["default"], adapted.model.base_model.vera_B["default"]
    a, b = projections(7, 8, 128, 64)  # the largest targeted in (down: 128) and out (q, down: 64) widths
    assert torch.equal(peft_a, a) and torch.equal(peft_b, b)
    assert not torch.equal(projections(8, 8, 128, 64)[0], a)  # another seed, other projections
    # per user only d [r] and b [N] per targeted linear: 2 layers x (q: 8 + 64, down: 8 + 64)
    assert adapted.n_params == 2 * (8 + 64 + 8 + 64)
    path = save_adapted(adapted, tmp_path / "v.safetensors", tiny)
    tensors, meta = wire.read_file(path)
    assert list(tensors) == ["adapter"] and tensors["adapter"].numel() == adapted.n_params
    assert meta["method_config"] == {"rank": 8, "targets": ["q_proj", "down_proj"], "seed": 7, "d_initial": 0.1}


def test_a_fresh_vera_row_is_the_base_exactly_and_a_trained_one_is_not(tiny):
    rm = RowModel(tiny)
    fresh = new_adapter(tiny, "vera")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    state = rm.row({n: p.detach() for n, p in fresh.params.items()}, "vera", fresh.config)
    base = rm.forward(ids, [rm.base_row, rm.base_row]).logits
    assert torch.equal(rm.forward(ids, [state, state]).logits, base)
    with torch.no_grad():
        assert torch.equal(fresh.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits)
    trained = moved(new_adapter(tiny, "vera"))
    state = rm.row({n: p.detach() for n, p in trained.params.items()}, "vera", trained.config)
    assert (rm.forward(ids, [state, rm.base_row]).logits[0] - base[0]).abs().max() > 1e-2


def test_rows_of_two_vera_configs_share_a_batch(tiny, tmp_path):
    """Rows with other seeds or ranks use their own projections in one batch, each equal to its model alone."""
    rm = RowModel(tiny)
    users = [moved(new_adapter(tiny, "vera", config=c), seed=i) for i, c in
             enumerate([VeraConfig(), VeraConfig(rank=16, seed=3, targets=("k_proj", "up_proj")), VeraConfig()])]
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    for i, (mixed, alone) in enumerate(mixed_and_alone(rm, ids, users, "vera")):
        assert (mixed - alone).abs().max() < 1e-5, i


@pytest.mark.parametrize("bad, needle", [
    ({"rank": 0}, "VeRA rank must be an integer"), ({"rank": 4097}, "VeRA rank"),
    ({"targets": ("q_proj", "lm_head")}, "VeRA targets must be among"), ({"targets": ()}, "VeRA targets"),
    ({"seed": -1}, "VeRA seed"), ({"d_initial": 0.0}, "VeRA d_initial"), ({"d_initial": float("nan")}, "d_initial"),
])
def test_bad_configs_are_refused_with_one_clear_line(bad, needle):
    with pytest.raises(SharedLLMError, match=needle):
        VeraConfig(**bad)


def test_a_row_with_tensors_of_another_shape_is_refused(tiny):
    rm = RowModel(tiny)
    named = {n: p.detach() for n, p in new_adapter(tiny, "vera").params.items()}
    with pytest.raises(SharedLLMError, match="needs d \\[8\\]"):
        rm.row(named, "vera", VeraConfig(rank=8))


def test_adapt_method_vera_with_its_options_then_eval_and_export(capsys, tiny, user_text, tmp_path):
    out = tmp_path / "v.safetensors"
    code = main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--method", "vera",
                 "--vera-rank", "32", "--vera-targets", "q_proj,v_proj,down_proj", "--vera-seed", "5",
                 "--steps", "20", "--seq", "64", "--lr", "1e-2", "--window", "64", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ppl_after"] < r["ppl_before"]
    assert r["params"] == 2 * (3 * 32 + 64 + 32 + 64)  # q, v (32 out), down per layer: r + N each
    adapted = load_adapted(tiny, out)
    assert adapted.method == "vera" and adapted.config == VeraConfig(32, ("q_proj", "v_proj", "down_proj"), 5)
    export = tmp_path / "peft"
    assert main(["export", "--adapter", str(out), "--out", str(export), "--base", "tiny"]) == 0
    assert (export / "adapter_config.json").is_file()
    assert json.loads((export / "adapter_config.json").read_text())["projection_prng_key"] == 5
    from peft import PeftModel

    from sharedllm.compat import quiet_peft_checkpointing_probe

    with pytest.warns(UserWarning, match="PRNG"), quiet_peft_checkpointing_probe():  # PEFT regenerates A and B
        model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(export))  # from the key, as sharedllm does
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted.model(input_ids=ids).logits)
    assert get_method("vera").caps.export == "peft"
