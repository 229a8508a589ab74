"""Route every request to its own user's gains and gather concurrent requests into shared forward passes.

`Router` owns the base (as a RowGainModel), the adapter store and an LRU cache of decoded gains keyed by the
adapter file's sha256. Validation of uploaded bytes is the CLI's, word for word (`wire.parse_file`,
`check_binding`, `decode_adapter` against the norm layout of this base), plus a size limit and the rule that
only norm adapters are served. The forward passes run on the continuous-batching engine (`scheduler.Engine`):
fair between users (round-robin admission, scores between decode steps), a per-user cap on queued and running
requests (`Busy`, HTTP 429), cancellation of abandoned rows and per-row failure isolation.
Several server processes may share one store: the cache is keyed by the adapter file's sha256 and every request
looks up the user's current sha256 in the index, so an upload through one process is used by all at once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from .. import wire
from ..adapters import get_method
from ..arch import Base
from ..errors import SharedLLMError
from ..log import say
from ..store import AdapterStore
from .fastdecode import LeanDecoder, unsupported
from .rowgains import Gains, RowGainModel
from .scheduler import Busy, Engine, Job  # noqa: F401  (Busy: re-exported for the app)

SERVED_METHOD = "norm"


class NoAdapter(SharedLLMError):
    """The user has no adapter stored (HTTP 404)."""


class TooLarge(SharedLLMError):
    """An upload over the size limit (HTTP 413)."""


class LRU:
    def __init__(self, capacity: int):
        self.capacity, self._d, self._lock = capacity, OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                self.hits += 1
                return self._d[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.capacity:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class Router:
    def __init__(self, base: Base, store: AdapterStore, max_batch: int = 16, cache_size: int = 1024,
                 max_adapter_bytes: int | None = None, max_batch_tokens: int = 16384, metrics=None,
                 window_s: float = 0.002, max_queued_per_user: int = 32, decode: str = "lean",
                 decode_dtype: str = "fp32", prefill_budget: int = 512):
        self.base, self.store = base, store
        self.model = RowGainModel(base)
        self.layout = wire.layout_of(get_method(SERVED_METHOD).trainable(base.model))
        params = sum(v.numel() for v in self.model.base_gains.vectors)
        self.max_adapter_bytes = max_adapter_bytes or params * 4 + (1 << 20)
        self.cache = LRU(cache_size)
        self._base_state = dict(base.model.named_parameters())
        self.max_text_bytes = self.context_limit() * _max_token_bytes(base.tokenizer)
        self.metrics = metrics
        self.engine = Engine(self.model, base.tokenizer.decode, getattr(base.tokenizer, "eos_id", None), max_batch,
                             max_batch_tokens, metrics, window_s, max_queued_per_user,
                             lean_decoder(self.model, decode, decode_dtype), prefill_budget)

    def close(self) -> None:
        self.engine.close()

    # ---- adapters ----------------------------------------------------------------------------------------
    def validate(self, data: bytes, source: str) -> tuple[dict, dict]:
        """Bytes -> (metadata, named fp32 tensors), refused exactly as `sharedllm eval --adapter` refuses them."""
        if len(data) > self.max_adapter_bytes:
            raise TooLarge(f"{source}: {len(data)} bytes is over this server's limit of {self.max_adapter_bytes}")
        tensors, meta = wire.parse_file(data, source)
        if meta.get("method") != SERVED_METHOD:
            raise SharedLLMError(f"{source}: method {meta.get('method')!r} is refused; this server serves only "
                                 f"norm adapters (RMSNorm gains, fp16 or int8), which can share a batch")
        wire.check_binding(meta, self.base.fingerprint, source)
        named = wire.decode_adapter(tensors, meta, self.layout, self._base_state, source)
        return meta, named

    def upload(self, user: str, data: bytes):
        meta, named = self.validate(data, f"adapter upload for user {user!r}")
        rec = self.store.put(user, data, meta)
        self.cache.put(rec.sha256, self.model.gains_from(named, rec.sha256))
        return rec

    def file_meta(self, sha256: str) -> dict:
        """The full metadata in a stored adapter's header (the index keeps only a few fields per row)."""
        _, meta = wire.parse_file(self.store.read(sha256), f"stored adapter {sha256[:16]}")
        return meta

    def gains_for(self, user: str, adapter: str = "user") -> Gains:
        """The gains a request of `user` runs with; adapter="none" asks explicitly for the bare base."""
        if adapter == "none":
            return self.model.base_gains
        for _ in range(3):  # the adapter may be replaced or deleted while we read it: look again
            rec = self.store.get(user)
            if rec is None:
                raise NoAdapter(f"user {user!r} has no adapter; upload one with PUT /v1/users/{user}/adapter, "
                                'or send "adapter": "none" to use the bare base explicitly')
            gains = self.cache.get(rec.sha256)
            if gains is not None:
                return gains
            try:
                data = self.store.read(rec.sha256)
            except FileNotFoundError:
                continue
            _, named = self.validate(data, f"stored adapter of user {user!r}")
            gains = self.model.gains_from(named, rec.sha256)
            self.cache.put(rec.sha256, gains)
            return gains
        raise NoAdapter(f"user {user!r}: the adapter changed while it was being read; retry")

    # ---- requests ----------------------------------------------------------------------------------------
    def prompt_ids(self, text: str, field_name: str) -> list[int]:
        """Token ids of a request's text; text that cannot fit the context is refused by its byte length
        before it is tokenised (no token is longer than `max_text_bytes / context` bytes)."""
        if len(text) > self.max_text_bytes or len(text.encode("utf-8")) > self.max_text_bytes:
            raise TooLarge(f"{field_name}: over {self.max_text_bytes} bytes, more than the model's context of "
                           f"{self.context_limit()} tokens can hold")
        tok = self.base.tokenizer
        ids = ([tok.bos_id] if getattr(tok, "bos_id", None) is not None else []) + tok.encode(text)
        limit = self.context_limit()
        if len(ids) > limit:
            raise SharedLLMError(f"{field_name}: {len(ids)} tokens is over the model's context of {limit}")
        return ids

    def context_limit(self) -> int:
        return int(getattr(self.base.model.config, "max_position_embeddings", 2048))

    def score(self, ids: list[int], gains: Gains, user: str = "", conn=None) -> Future:
        """`conn`: the client's socket, if known (`hangup.conn_socket`): the engine drops the job if it closes."""
        if len(ids) < 2:
            raise SharedLLMError("text: nothing to score (need at least one token after the first)")
        return self.engine.submit(Job("score", ids, gains, user, conn=conn))

    def generate(self, ids: list[int], gains: Gains, max_tokens: int, temperature: float, seed, *, user: str = "",
                 top_p: float = 1.0, stop: tuple[str, ...] = (), on_text=None, conn=None) -> Future:
        if len(ids) + max_tokens > self.context_limit():
            raise SharedLLMError(f"prompt + max_tokens = {len(ids) + max_tokens} tokens is over the model's "
                                 f"context of {self.context_limit()}")
        if not ids:
            raise SharedLLMError("prompt: empty prompt on a tokenizer without a BOS token")
        return self.engine.submit(Job("generate", ids, gains, user, max_tokens, temperature, seed, top_p,
                                      tuple(stop), on_text, conn))

    def stats(self) -> dict:
        return {**self.engine.stats(), "cache_entries": len(self.cache), "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses}


def _max_token_bytes(tok) -> int:
    """An upper bound on the UTF-8 bytes of text one token can stand for (1 for the byte tokenizer)."""
    hf = getattr(tok, "hf", None)
    if hf is None:
        return 1
    pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
    return max(len(p.encode("utf-8")) for p in pieces if p) + 1


# --decode-dtype: (decoder layers' weights, head's weights)
DECODE_DTYPES = {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16,) * 2, "int8": (torch.int8,) * 2,
                 "int4": (torch.int4,) * 2, "int4-head8": (torch.int4, torch.int8),
                 "int8-head4": (torch.int8, torch.int4)}


def lean_decoder(rgm: RowGainModel, decode: str, dtype: str):
    """The decode step the engine runs: `lean` (fastdecode: fp32, or a bf16 / int8 / int4 weight copy, or
    int8 layers with an int4 head, or the reverse) or `hf` (None)."""
    if decode == "hf":
        if dtype != "fp32":
            raise SharedLLMError(f"--decode-dtype {dtype} needs --decode lean (the HF path decodes in fp32)")
        return None
    why = unsupported(rgm.model)
    if why is not None:
        if dtype != "fp32":
            raise SharedLLMError(f"--decode-dtype {dtype}: the lean decode step does not support this base ({why})")
        say(f"lean decode step unsupported ({why}): decoding with the HF forward")
        return None
    layers, head = DECODE_DTYPES[dtype]
    return LeanDecoder(rgm, layers, head_dtype=head)
