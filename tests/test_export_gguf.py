"""`sharedllm export --format gguf`: the default base's GGUF with a user's gains as its norm weights."""
import numpy as np
import pytest
import torch

from sharedllm import registry
from sharedllm.base import load_base
from sharedllm.cli import main
from sharedllm.gguf_export import gguf_name
from sharedllm.personalise import load_adapted, new_adapter, save_adapted


def test_norm_names_map_to_llama_cpp_names():
    assert gguf_name("model.norm.weight") == "output_norm.weight"
    assert gguf_name("model.layers.7.input_layernorm.weight") == "blk.7.attn_norm.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    with pytest.raises(Exception, match="no GGUF counterpart"):
        gguf_name("model.layers.0.q_norm.weight")


@pytest.mark.slow
def test_export_gguf_replaces_exactly_the_norms(tmp_path):
    from gguf import GGUFReader

    base = load_base("default")
    adapted = new_adapter(base, "norm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.params.values():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    save_adapted(adapted, tmp_path / "ann.safetensors", base)
    out = tmp_path / "ann.gguf"
    assert main(["export", "--adapter", str(tmp_path / "ann.safetensors"), "--format", "gguf",
                 "--out", str(out)]) == 0
    new, old = GGUFReader(str(out)), GGUFReader(str(registry.gguf_path(registry.resolve("default"))))
    assert [f for f in new.fields] == [f for f in old.fields]
    stored = load_adapted(base, tmp_path / "ann.safetensors").params  # the gains as the file holds them (fp16)
    by_name = {gguf_name(n): v for n, v in stored.items()}
    for t_new, t_old in zip(new.tensors, old.tensors):
        assert t_new.name == t_old.name
        if t_new.name in by_name:
            assert np.array_equal(t_new.data, by_name[t_new.name].detach().float().numpy().astype(np.float32))
            assert not np.array_equal(t_new.data, t_old.data)
        else:
            assert np.array_equal(t_new.data, t_old.data)
    assert len(by_name) == 61
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, verbose=False)
    text = llm("def parse(", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert isinstance(text, str) and text
