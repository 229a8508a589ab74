"""`--base DIR`: any local HF checkpoint with RMSNorms (Llama, Qwen2, Mistral, Gemma's 1 + w convention)."""
import pytest
import torch

from sharedllm.arch import gain_offset, norm_modules
from sharedllm.base import load_base
from sharedllm.cli import main
from sharedllm.errors import SharedLLMError


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "</s>"})
    return fast


def hf_dir(tmp_path, arch: str):
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM"),
                          "gemma": ("GemmaConfig", "GemmaForCausalLM")}[arch]
    cfg = getattr(transformers, cfg_cls)(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=512)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    path = tmp_path / arch
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_adapt_on_a_local_hf_checkpoint(arch, tmp_path, user_text, capsys):
    path = hf_dir(tmp_path, arch)
    base = load_base(str(path))
    norms = norm_modules(base.model)
    assert len(norms) == 2 * 2 + 1
    assert all(gain_offset(m) == (1.0 if arch == "gemma" else 0.0) for m in norms.values())
    out = tmp_path / "a.safetensors"
    assert main(["adapt", "--text", str(user_text), "--out", str(out), "--base", str(path), "--steps", "2",
                 "--seq", "32", "--window", "32", "--json"]) == 0
    assert '"params": 160' in capsys.readouterr().out


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SharedLLMError, match="no config.json"):
        load_base(str(tmp_path))
