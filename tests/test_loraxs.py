"""loraxs (LoRA-XS): the shared bases are the base weight's own truncated SVD (signs fixed, never in the file), a
fresh adapter is the base exactly, delta W = U_r S_r R V_r^T, the CLI trains it with its options, export refuses.
(The mixed-batch, decode and fleet exactness tests are in tests/test_rows.py; the generic battery in test_adapters.)"""
import json

import pytest
import torch

from sharedllm import wire
from sharedllm.adapters.loraxs import LoraXSConfig, svd_bases
from sharedllm.adapters.rows import RowModel
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, save_adapted

from .serve_kit import mixed_and_alone, moved


def test_the_bases_are_the_weights_truncated_svd_with_fixed_signs(tiny):
    w = tiny.model.model.layers[1].mlp.down_proj.weight  # [64, 128]
    us, vt = svd_bases(w, 8)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best8 = (u[:, :8] * s[:8]) @ vh[:8]
    assert us.shape == (64, 8) and vt.shape == (8, 128) and us.dtype == torch.float32
    assert torch.allclose((us.double() @ vt.double()), best8, atol=1e-5)  # the best rank-8 approximation
    assert torch.allclose(vt.double() @ vt.double().T, torch.eye(8, dtype=torch.float64), atol=1e-5)
    top = us.abs().argmax(0)
    assert (us[top, torch.arange(8)] > 0).all()  # each singular pair's sign fixed: U's largest entry positive
    assert svd_bases(w, 8) is svd_bases(w, 8)  # cached per weight tensor
    full_us, full_vt = svd_bases(w, 64)
    assert torch.allclose(full_us @ full_vt, w, atol=1e-5)
    with pytest.raises(SharedLLMError, match="rank 65 is over this base's linear of shape \\[64, 128\\]"):
        svd_bases(w, 65)


def test_delta_w_is_us_r_vt_and_only_r_is_saved(tiny, tmp_path):
    cfg = LoraXSConfig(rank=4, targets=("v_proj", "up_proj"))
    adapted = moved(new_adapter(tiny, "loraxs", config=cfg), scale=0.05)
    assert adapted.n_params == 2 * 2 * 16 and all(p.shape == (4, 4) for p in adapted.params.values())
    lin = adapted.model.model.layers[0].self_attn.v_proj
    us, vt = svd_bases(lin.weight, 4)
    r = adapted.params["model.layers.0.self_attn.v_proj.loraxs_R"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(lin(x), x @ (lin.weight + us @ r @ vt).T, atol=1e-5)
    path = save_adapted(adapted, tmp_path / "x.safetensors", tiny)
    tensors, meta = wire.read_file(path)
    assert tensors["adapter"].numel() == adapted.n_params and path.stat().st_size < 2 * adapted.n_params + 1024
    assert meta["method_config"] == {"rank": 4, "targets": ["v_proj", "up_proj"]}
    loaded = load_adapted(tiny, path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, adapted.model(input_ids=ids).logits, atol=1e-2)


def test_a_fresh_loraxs_row_is_the_base_exactly_and_rows_of_two_ranks_share_a_batch(tiny):
    rm = RowModel(tiny)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(3))
    fresh = new_adapter(tiny, "loraxs")
    state = rm.row({n: p.detach() for n, p in fresh.params.items()}, "loraxs", fresh.config)
    base = rm.forward(ids, [rm.base_row] * 3).logits
    assert torch.equal(rm.forward(ids, [state] * 3).logits, base)
    users = [moved(new_adapter(tiny, "loraxs", config=c), scale=0.2, seed=i) for i, c in
             enumerate([LoraXSConfig(), LoraXSConfig(rank=4, targets=("q_proj", "down_proj")), LoraXSConfig()])]
    for i, (mixed, alone) in enumerate(mixed_and_alone(rm, ids, users, "loraxs")):
        assert (mixed - alone).abs().max() < 1e-5 and (alone - base[i]).abs().max() > 1e-2, i


@pytest.mark.parametrize("bad, needle", [
    ({"rank": 0}, "LoRA-XS rank must be an integer"), ({"rank": 65}, "LoRA-XS rank"), ({"rank": True}, "rank"),
    ({"targets": ("q_proj", "lm_head")}, "LoRA-XS targets must be among"), ({"targets": ("q_proj",) * 2}, "repeat"),
])
def test_bad_configs_are_refused_with_one_clear_line(bad, needle):
    with pytest.raises(SharedLLMError, match=needle):
        LoraXSConfig(**bad)


def test_a_row_with_tensors_of_another_shape_is_refused(tiny):
    rm = RowModel(tiny)
    named = {n: p.detach() for n, p in new_adapter(tiny, "loraxs").params.items()}
    with pytest.raises(SharedLLMError, match="needs R \\[8, 8\\]"):
        rm.row(named, "loraxs", LoraXSConfig(rank=8))
    with pytest.raises(SharedLLMError, match="tensors beyond"):
        rm.row({**named, "extra.loraxs_R": torch.zeros(16, 16)}, "loraxs", LoraXSConfig())


def test_adapt_method_loraxs_with_its_options_then_eval_and_export_refused(capsys, tiny, user_text, tmp_path):
    out = tmp_path / "x.safetensors"
    code = main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--method", "loraxs",
                 "--loraxs-rank", "8", "--loraxs-targets", "q_proj,v_proj,down_proj",
                 "--steps", "20", "--seq", "64", "--lr", "1e-2", "--window", "64", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ppl_after"] < r["ppl_before"] and r["params"] == 2 * 3 * 64
    adapted = load_adapted(tiny, out)
    assert adapted.method == "loraxs" and adapted.config == LoraXSConfig(8, ("q_proj", "v_proj", "down_proj"))
    code = main(["eval", "--text", str(user_text), "--adapter", str(out), "--base", "tiny", "--window", "64",
                 "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(r["ppl_after"], rel=1e-3)
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "e"), "--base", "tiny"]) == 2
    assert "cannot be exported" in capsys.readouterr().err
