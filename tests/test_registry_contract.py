"""The adapter registry's contract: a typed protocol, a frozen config per method recorded in every adapter file,
one registration per name, and CLI options generated from the configs."""
import dataclasses
import json

import pytest
import torch

from sharedllm import wire
from sharedllm.adapters import (METHODS, AdapterMethod, Capabilities, NoConfig, config_from_json, get_method,
                                register)
from sharedllm.adapters.lora import LoraConfig
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError
from sharedllm.personalise import load_adapted, new_adapter, save_adapted


class _Fake:
    name = "norm"
    caps = Capabilities()

    def __init__(self, config=NoConfig()):
        self.config = config

    def attach(self, model):
        return model

    def trainable(self, model):
        return {}


def test_every_method_implements_the_protocol_with_a_frozen_config():
    for name, method in METHODS.items():
        assert isinstance(method, AdapterMethod) and method.name == name
        assert dataclasses.is_dataclass(method.config) and method.config.__dataclass_params__.frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["lora"].config.rank = 8


def test_a_duplicate_name_is_refused_and_the_registry_is_unchanged():
    before = dict(METHODS)
    with pytest.raises(SharedLLMError, match="'norm' is already registered .*NormMethod"):
        register(_Fake())
    assert METHODS == before


def test_register_refuses_a_mutable_config_and_a_non_method():
    @dataclasses.dataclass
    class Mutable:
        x: int = 1

    fake = _Fake(Mutable())
    fake.name = "mutable-config"
    with pytest.raises(SharedLLMError, match="frozen dataclass"):
        register(fake)
    with pytest.raises(SharedLLMError, match="not an adapter method"):
        register(object())
    assert "mutable-config" not in METHODS


def test_lora_config_round_trips_through_the_adapter_file(tiny, tmp_path):
    adapted = new_adapter(tiny, "lora", seed=0, config=LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    assert adapted.n_params == 2 * 2 * ((64 + 64) + (64 + 32))  # 2 layers x rank 2 x (q: 64->64, v: 64->32)
    path = save_adapted(adapted, tmp_path / "r2.safetensors", tiny)
    meta = wire.read_file(path)[1]
    assert meta["method_config"] == {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}
    back = load_adapted(tiny, path)
    assert back.config == adapted.config and back.n_params == adapted.n_params
    assert all(torch.equal(back.params[n], adapted.params[n].detach().half().float()) for n in adapted.params)


def test_norm_files_record_an_empty_config_and_old_files_without_one_still_load(tiny, tmp_path):
    adapted = new_adapter(tiny, "norm")
    path = save_adapted(adapted, tmp_path / "n.safetensors", tiny)
    tensors, meta = wire.read_file(path)
    assert meta["method_config"] == {}
    old = {k: v for k, v in meta.items() if k != "method_config"}  # a file from before configs were recorded
    back = load_adapted(tiny, data=wire.adapter_bytes(tensors, old), source="old")
    assert back.config == NoConfig() and back.n_params == adapted.n_params


@pytest.mark.parametrize("config, why", [({"rank": 2, "dropout": 0.1}, "unknown field"),
                                         ({"rank": "2"}, "must be like 4"), ({"rank": 0}, "rank must be"),
                                         ([2], "must be a JSON object")])
def test_a_bad_recorded_config_is_refused_by_the_parser(tiny, tmp_path, config, why):
    path = save_adapted(new_adapter(tiny, "lora", seed=0), tmp_path / "l.safetensors", tiny)
    tensors, meta = wire.read_file(path)
    with pytest.raises(SharedLLMError, match=why):
        wire.parse_file(wire.adapter_bytes(tensors, {**meta, "method_config": config}), "bad")


def test_get_method_builds_a_configured_copy_and_leaves_the_default():
    lora = get_method("lora", {"rank": 8})
    assert lora.config.rank == 8 and METHODS["lora"].config.rank == 4 and lora is not METHODS["lora"]
    assert get_method("lora", config_from_json("lora", {})) is METHODS["lora"]
    with pytest.raises(SharedLLMError, match="takes a NoConfig"):
        get_method("norm", LoraConfig())


def test_cli_options_come_from_the_configs(capsys, user_text, tmp_path):
    out = tmp_path / "l.safetensors"
    code = main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--method", "lora",
                 "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--steps", "2", "--seq", "32",
                 "--window", "32", "--eval-tokens", "64", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["params"] == 896 and wire.read_file(out)[1]["method_config"]["rank"] == 2
    code = main(["adapt", "--text", str(user_text), "--out", str(out), "--base", "tiny", "--lora-rank", "2"])
    assert code == 2 and "--lora-rank do not apply to --method norm" in capsys.readouterr().err
