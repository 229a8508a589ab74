"""The `logprobs` object of OpenAI's legacy completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.

The numbers come from the engine (`compute.score_batch` for echoed prompt tokens, `compute.step_logprobs` for
generated ones): entries `(token id, its logprob or None, [(id, logprob), ...] best first or None)`. Here they get
their strings: a token's string is its own text (special tokens by name); a token that is only part of a UTF-8
character is written as its bytes, `bytes:\\xe2\\x80` (OpenAI's convention), so no two tokens share a string by
accident. `top_logprobs` maps the k most likely tokens' strings to their logprobs, best first, plus the chosen
token if it is not among them (so up to k + 1 entries, as OpenAI's "logprobs + 1"). `text_offset` is where each
token's text starts in the returned text, in characters: a token that ends inside a multi-byte character adds no
text of its own (the character starts at the token that completes it), and tokens past the text's end (a stop
string, the end-of-text token) are placed at its end.
"""
from __future__ import annotations

import math
import re
import weakref

REPLACEMENT = "\ufffd"
MAX_K = 5  # OpenAI's limit on `logprobs` for completions


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (byte-level BPE tokenizers: GPT-2, Llama 3, SmolLM, Qwen2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_LEVEL = _byte_level_decoder()
SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _bytes_name(b: bytes) -> str:
    return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class TokenNames:
    """Token id -> its string in a `logprobs` object (cached per id)."""

    def __init__(self, tokenizer):
        self.tok, self.hf = tokenizer, getattr(tokenizer, "hf", None)
        self._cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        name = self._cache.get(i)
        if name is None:
            name = self._cache[i] = self._name(i)
        return name

    def _name(self, i: int) -> str:
        if self.hf is None:  # the byte tokenizer: ids 0..255 are bytes, then BOS and EOS
            if i == getattr(self.tok, "bos_id", None):
                return "<bos>"
            if i == getattr(self.tok, "eos_id", None):
                return "<eos>"
            s = self.tok.decode([i])
            return _bytes_name(bytes([i])) if REPLACEMENT in s and i < 256 else s
        s = self.hf.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if REPLACEMENT in s:  # part of a character: its bytes, where the vocabulary says what they are
            raw = self.hf.convert_ids_to_tokens(i) or ""
            if raw and all(c in BYTE_LEVEL for c in raw):
                return _bytes_name(bytes(BYTE_LEVEL[c] for c in raw))
            m = SPM_BYTE.fullmatch(raw)
            if m:
                return _bytes_name(bytes([int(m.group(1), 16)]))
        return s


_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def names_for(tokenizer) -> TokenNames:
    names = _NAMES.get(tokenizer)
    if names is None:
        names = _NAMES[tokenizer] = TokenNames(tokenizer)
    return names


class Offsets:
    """Where each token's text starts, in characters from `base`, as the tokens arrive one by one (the text decoded
    incrementally, a short window at a time: text is counted once no character is left incomplete)."""

    def __init__(self, decode, base: int = 0):
        self.decode, self.done = decode, base
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the last text counted

    def push(self, token: int) -> int:
        start = self.done
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix: self.read]) if self.read > self.prefix else ""
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.done += len(after) - len(before)
            self.prefix, self.read = self.read, len(self.ids)
        return start


def _finite(x: float | None) -> float | None:
    if x is None or math.isfinite(x):
        return x
    return None if math.isnan(x) else -9999.0  # JSON has no infinities; -9999 as vLLM writes log(0)


def _top(names: TokenNames, token: int, logprob: float | None, top) -> dict | None:
    if top is None:
        return None
    out: dict[str, float] = {}
    for i, v in top:
        out.setdefault(names(i), _finite(v))
    out.setdefault(names(token), _finite(logprob))
    return out


def logprobs_obj(names: TokenNames, entries: list, starts: list[int]) -> dict:
    """OpenAI's `logprobs` object for `entries` (id, logprob or None, top or None) starting at `starts`."""
    return {"tokens": [names(e[0]) for e in entries],
            "token_logprobs": [_finite(e[1]) for e in entries],
            "top_logprobs": [_top(names, *e) for e in entries],
            "text_offset": list(starts)}
