"""A tiny common face for tokenizers: the built-in byte tokenizer and any HF tokenizer."""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus BOS/EOS; needs no files. Used by the tiny base."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path) -> None:  # nothing to save: the tokenizer is built in
        return None


class HFTokenizer:
    """Wraps a transformers tokenizer so that encode/decode never add special tokens."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.eos_token_id
        self.bos_id = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def save(self, path) -> None:
        self.hf.save_pretrained(str(path))
