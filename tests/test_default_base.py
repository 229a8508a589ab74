"""Loads the real embedded default base (SmolLM2-135M-Instruct) and trains a couple of norm-only steps."""
import pytest
import torch

from sharedllm.base import load_base
from sharedllm.personalise import evaluate_on, load_adapted, personalise, save_adapted
from sharedllm.train import TrainConfig

from .conftest import CORPORA


@pytest.mark.slow
def test_default_base_norm_only_steps(tmp_path):
    base = load_base("default")
    assert base.model.config.num_hidden_layers == 30
    text = (CORPORA / "programmer" / "cpython_asyncio.txt").read_text()[:60_000]
    ids = torch.tensor(base.tokenizer.encode(text))
    train, held = ids[: int(0.8 * len(ids))], ids[int(0.8 * len(ids)):]
    before = evaluate_on(base.model, base, held, window=128, max_tokens=256)
    assert 2 < before["ppl"] < 60, "the real pretrained base must model Python source far better than chance"
    adapted = personalise(base, train, "norm", TrainConfig(steps=2, batch=1, seq=64))
    assert adapted.n_params == 35_136 and len(adapted.params) == 61
    assert adapted.result.steps == 2
    path = save_adapted(adapted, tmp_path / "norm.safetensors", base)
    assert path.stat().st_size <= 2 * 35_136 + 1024
    loaded = load_adapted(base, path)
    after = evaluate_on(loaded.model, base, held, window=128, max_tokens=256)
    assert after["ppl"] != before["ppl"]
