"""road (RoAd via PEFT): per-pair rotations of a linear's outputs, each variant's numbers per user, a fresh adapter
is the base exactly, the CLI trains it with its options, and its PEFT export loads back to the same logits.
(The mixed-batch, decode and fleet exactness tests are in tests/test_rows.py; the generic battery in test_adapters.)"""
import copy
import json

import pytest
import torch

from sharedllm.adapters.road import RoadConfig, cols, rotate
from sharedllm.adapters.rows import RowModel
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter

from .serve_kit import mixed_and_alone, moved


def test_a_pair_is_rotated_by_its_angle_and_scaled_by_its_alpha():
    y = torch.arange(8.0)[None]  # one group of 8: pairs (0, 4), (1, 5), (2, 6), (3, 7)
    theta, alpha = torch.tensor([torch.pi / 2, 0.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    first, second = cols("road_1", 8, theta, alpha)
    out = rotate(y, first, second, 8)[0]
    assert torch.allclose(out, torch.tensor([-4.0, 2.0, 2.0, 3.0, 0.0, 10.0, 6.0, 7.0]), atol=1e-6)


@pytest.mark.parametrize("variant, per_width", [("road_1", 1), ("road_2", 2), ("road_4", 4)])
def test_numbers_per_user_per_variant(tiny, variant, per_width):
    adapted = new_adapter(tiny, "road", config=RoadConfig(variant=variant, group_size=16))
    widths = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # the seven projections' outputs, 2 layers
    assert adapted.n_params == per_width * widths


def test_fresh_rows_are_the_base_exactly_and_rows_of_two_group_sizes_share_a_batch(tiny):
    rm = RowModel(tiny)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(3))
    fresh = new_adapter(tiny, "road")
    state = rm.row({n: p.detach() for n, p in fresh.params.items()}, "road", fresh.config)
    base = rm.forward(ids, [rm.base_row] * 3).logits
    assert torch.equal(rm.forward(ids, [state] * 3).logits, base)
    users = [moved(new_adapter(tiny, "road", config=c), seed=i) for i, c in
             enumerate([RoadConfig(), RoadConfig("road_4", 8, ("q_proj", "down_proj")), RoadConfig("road_2")])]
    for i, (mixed, alone) in enumerate(mixed_and_alone(rm, ids, users, "road")):
        assert (mixed - alone).abs().max() < 1e-5 and (alone - base[i]).abs().max() > 1e-2, i


@pytest.mark.parametrize("bad, needle", [
    ({"variant": "road_3"}, "RoAd variant must be one of"), ({"group_size": 7}, "RoAd group_size must be an even"),
    ({"group_size": 0}, "group_size"), ({"targets": ("lm_head",)}, "RoAd targets must be among"),
])
def test_bad_configs_are_refused_with_one_clear_line(bad, needle):
    with pytest.raises(SharedLLMError, match=needle):
        RoadConfig(**bad)


def test_a_group_size_that_does_not_divide_a_width_is_refused_at_attach(tiny):
    with pytest.raises(SharedLLMError, match="group_size 64 does not divide the width of k_proj, v_proj \\(32, 32\\)"):
        new_adapter(tiny, "road", config=RoadConfig(group_size=64))


def test_adapt_method_road_with_its_options_then_export_loads_back_in_peft(capsys, tiny, user_text, tmp_path):
    out = tmp_path / "r.safetensors"
    code = main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--method", "road",
                 "--road-variant", "road_2", "--road-group-size", "16", "--road-targets", "v_proj,up_proj",
                 "--steps", "20", "--seq", "64", "--lr", "1e-2", "--window", "64", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ppl_after"] < r["ppl_before"] and r["params"] == 2 * 2 * (32 + 128)
    adapted = load_adapted(tiny, out)
    assert adapted.method == "road" and adapted.config == RoadConfig("road_2", 16, ("v_proj", "up_proj"))
    export = tmp_path / "peft"
    assert main(["export", "--adapter", str(out), "--out", str(export), "--base", "tiny"]) == 0
    from peft import PeftModel

    from sharedllm.compat import quiet_peft_checkpointing_probe

    with quiet_peft_checkpointing_probe():
        model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(export))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted.model(input_ids=ids).logits)
