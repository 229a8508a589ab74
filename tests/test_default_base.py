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


@pytest.mark.slow
def test_default_base_mixed_batch_of_base_norm_and_lora_rows_equals_each_alone(tmp_path):
    """The per-row contract on the real base: base-only, norm and two LoRA rows in one forward and one lean decode
    step, each as close to the row alone (PEFT's PeftModel for LoRA) as HF's own model is to itself when it runs
    that row in a batch of 4 (fp32 GEMMs block differently by batch size: measured up to 1e-3 on logits of ~20 for
    a strongly perturbed norm adapter, 4e-5 for the bare base), plus 1e-4."""
    from sharedllm.adapters.rows import RowModel
    from sharedllm.personalise import new_adapter
    from sharedllm.serve.compute import prefill
    from sharedllm.serve.fastdecode import LeanDecoder

    base = load_base("default")
    users = [None, new_adapter(base, "norm"), new_adapter(base, "lora", seed=1), new_adapter(base, "lora", seed=2)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in users[1:]:
            for p in u.params.values():
                p.add_((0.05 if u.method == "lora" else 0.1) * torch.randn(p.shape, generator=g))
    rm = RowModel(base)
    states = [rm.base_row] + [rm.row({n: p.detach() for n, p in u.params.items()}, u.method, u.config)
                              for u in users[1:]]
    texts = ("def parse(text): return", "Once upon a time there", "import os, sys, re", "The cat sat on the mat")
    prompts = [base.tokenizer.encode(t)[:4] for t in texts]
    logits, cache, pads = prefill(rm, prompts, states)
    dec = LeanDecoder(rm)
    kv = dec.new_cache()
    kv.join(cache, pads)
    nxt = logits.argmax(-1).tolist()
    step = dec.step(kv, nxt, rm.batch(states))
    with torch.no_grad():
        for b, (u, p) in enumerate(zip(users, prompts)):
            model = base.model if u is None else u.model
            seq = torch.tensor([p + [nxt[b]]])
            ref = model(input_ids=seq).logits[0]
            hf_batch = (model(input_ids=seq.repeat(4, 1)).logits[0] - ref).abs().max()  # HF vs itself, batched
            bound = 1e-4 + 2 * hf_batch
            assert (logits[b] - ref[-2]).abs().max() <= bound, (b, hf_batch)
            assert (step[b] - ref[-1]).abs().max() <= bound, (b, hf_batch)
        alone_lora = users[2].model(input_ids=torch.tensor([prompts[2]])).logits[0, -1]
        assert (alone_lora - base.model(input_ids=torch.tensor([prompts[2]])).logits[0, -1]).abs().max() > 1e-2
