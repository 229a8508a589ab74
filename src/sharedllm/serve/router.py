"""Route every request to its own user's adapter and gather concurrent requests into shared forward passes.

`Router` owns the base (as an `adapters.rows.RowModel`), the adapter store and an LRU cache of packed row states,
keyed by the adapter file's sha256 and bounded in bytes. Validation of uploaded bytes is the CLI's, word for word
(`wire.parse_file`, `check_binding`, `decode_adapter` against the method's layout on this base), plus a size
limit and the rule that only methods with a per-row kernel (`caps.rows`: norm, LoRA) are served; the kernel packs
the adapter at upload, so an adapter the server cannot run is refused then, never at request time. The forward passes run on the continuous-batching engine (`scheduler.Engine`):
fair between users (round-robin admission, scores between decode steps, at most `max_rows_per_user` decode rows
per user), a per-user cap on queued and running requests (`Busy`, HTTP 429), cancellation of abandoned rows and per-row failure isolation.
Several server processes may share one store: the cache is keyed by the adapter file's sha256 and every request
looks up the user's current sha256 in the index, so an upload through one process is used by all at once.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from .. import stack, wire
from ..adapters import METHODS, get_method, shared_copy
from ..adapters.rows import RowModel, RowState
from ..arch import Base
from ..errors import SharedLLMError
from ..log import say
from ..quant import lora_joint
from ..store import AdapterStore
from .fastdecode import LeanDecoder, unsupported
from .scheduler import Busy, Engine, Job  # noqa: F401  (Busy: re-exported for the app)


class NoAdapter(SharedLLMError):
    """The user has no adapter stored (HTTP 404)."""


class TooLarge(SharedLLMError):
    """An upload over the size limit (HTTP 413)."""


class LRU:
    """Least-recently-used values bounded in bytes (`size(value)`); the newest entry always stays."""

    def __init__(self, capacity_bytes: int, size=lambda v: v.nbytes):
        self.capacity, self.size, self._d, self._lock = capacity_bytes, size, OrderedDict(), threading.Lock()
        self.hits = self.misses = self.evictions = self.nbytes = 0

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
            if key in self._d:
                self.nbytes -= self.size(self._d.pop(key))
            self._d[key] = value
            self.nbytes += self.size(value)
            while self.nbytes > self.capacity and len(self._d) > 1:
                _, old = self._d.popitem(last=False)
                self.nbytes -= self.size(old)
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:  # no hit, no miss, no reordering: for reports (GET /v1/users)
        with self._lock:
            return key in self._d


class Router:
    def __init__(self, base: Base, store: AdapterStore, max_batch: int = 16, cache_bytes: int = 1 << 30,
                 max_adapter_bytes: int | None = None, max_batch_tokens: int = 16384, metrics=None,
                 window_s: float = 0.002, max_queued_per_user: int = 32, decode: str = "lean",
                 decode_dtype: str = "fp32", prefill_budget: int = 512, max_rows_per_user: int | None = None):
        self.base, self.store = base, store
        self.model = RowModel(base)
        self._layouts: dict = {}  # (method, config) -> its tensors' (name, shape) on this base
        self.max_adapter_bytes = max_adapter_bytes or _largest_adapter_bytes(self.model)
        # PUT /v1/shared/...: joint LoRA bases, or a group adapter (no larger than an adapter)
        self.max_shared_bytes = max(lora_joint.max_shared_bytes(self.model.linear_shapes), self.max_adapter_bytes)
        self.cache = LRU(cache_bytes)
        self._base_state = dict(base.model.named_parameters())
        self.max_text_bytes = self.context_limit() * _max_token_bytes(base.tokenizer)
        self.metrics = metrics
        self.engine = Engine(self.model, base.tokenizer.decode, getattr(base.tokenizer, "eos_id", None), max_batch,
                             max_batch_tokens, metrics, window_s, max_queued_per_user,
                             lean_decoder(self.model, decode, decode_dtype), prefill_budget,
                             max_rows_per_user=max_rows_per_user)

    def close(self) -> None:
        self.engine.close()

    # ---- adapters ----------------------------------------------------------------------------------------
    def validate(self, data: bytes, source: str) -> tuple[dict, dict]:
        """Bytes -> (metadata, named fp32 tensors), refused exactly as `sharedllm eval --adapter` refuses them."""
        if len(data) > self.max_adapter_bytes:
            raise TooLarge(f"{source}: {len(data)} bytes is over this server's limit of {self.max_adapter_bytes}")
        tensors, meta = wire.parse_file(data, source)
        method = get_method(meta["method"], meta.get("method_config"))
        if method.caps.rows is None:
            served = ", ".join(sorted(n for n, m in METHODS.items() if m.caps.rows is not None))
            raise SharedLLMError(f"{source}: method {method.name!r} is refused; this server serves the methods "
                                 f"that can share a batch row by row: {served}")
        parts = [self.group_row(meta, source)] if stack.ON_TOP in meta else []  # the group runs as its own part
        bound = stack.stacked_fingerprint(self.base.fingerprint, meta[stack.ON_TOP]["sha256"]) if parts \
            else self.base.fingerprint
        wire.check_binding(meta, bound, source)
        named = lora_joint.decode(tensors, meta, self.layout(method), self._base_state, source, [self.store.shared],
                                  self.base.fingerprint)  # a joint core file: its LoRA, from the stored bases
        try:
            row = self.model.row(named, method.name, method.config)
            if parts:
                row = self.model.stacked(parts + [row])
        except SharedLLMError as e:
            raise SharedLLMError(f"{source}: {e}") from None
        return meta, row

    def group_row(self, meta: dict, source: str) -> RowState:
        """The row part of the group adapter a user's file is on top of: from the row cache (keyed, like users'
        files, by the file's sha256), else found in the store's shared/, checked and packed once for all its users."""
        sha = meta[stack.ON_TOP]["sha256"]
        row = self.cache.get(sha)
        if row is None:
            group = stack.find_group(meta, [self.store.shared], source)
            group_meta, row = self.validate(group, f"{source}: its group adapter")
            stack.group_method(group_meta, source)
            row = _with_sha(row, sha)
            self.cache.put(sha, row)
        return row

    def layout(self, method) -> list:
        """The (name, shape) list of `method`'s tensors on this base (attached once to a weightless copy)."""
        key = (method.name, method.config)
        if key not in self._layouts:
            self._layouts[key] = wire.layout_of(method.trainable(method.attach(shared_copy(self.base.model))))
        return self._layouts[key]

    def upload(self, user: str, data: bytes):
        meta, row = self.validate(data, f"adapter upload for user {user!r}")
        rec = self.store.put(user, data, meta)
        self.cache.put(rec.sha256, _with_sha(row, rec.sha256))
        return rec

    def put_shared(self, sha256: str, data: bytes) -> dict:
        """Store a file users' adapters name by sha256: the shared bases of jointly compressed LoRAs, or a group
        adapter (a LoRA bound to this base) that users' parts are trained on top of (sharedllm.stack); the users'
        files are uploaded after."""
        if stack.is_adapter_file(data):
            source = f"group adapter {sha256[:16]}"
            if stack.sha256_of(data) != sha256:
                raise SharedLLMError(f"{source}: the body's sha256 is {stack.sha256_of(data)}, not {sha256}")
            meta, row = self.validate(data, source)
            stack.group_method(meta, source)
            self.store.put_shared(sha256, data)
            self.cache.put(sha256, _with_sha(row, sha256))
            return {"sha256": sha256, "bytes": len(data), "group": meta["method"], "params": meta["params"]}
        source = f"shared bases {sha256[:16]}"
        if len(data) > self.max_shared_bytes:
            raise TooLarge(f"{source}: {len(data)} bytes is over this server's limit of {self.max_shared_bytes}")
        shared = lora_joint.check_upload(data, sha256, self.base.fingerprint, source)
        self.store.put_shared(sha256, data)
        return {"sha256": sha256, "bytes": len(data), "rank": shared.rank, "sites": len(shared.sites)}

    def file_meta(self, sha256: str) -> dict:
        """The full metadata in a stored adapter's header (the index keeps only a few fields per row)."""
        _, meta = wire.parse_file(self.store.read(sha256), f"stored adapter {sha256[:16]}")
        return meta

    def row_for(self, user: str, adapter: str = "user") -> RowState:
        """The adapter a request of `user` runs with; adapter="none" asks explicitly for the bare base."""
        if adapter == "none":
            return self.model.base_row
        for _ in range(3):  # the adapter may be replaced or deleted while we read it: look again
            rec = self.store.get(user)
            if rec is None:
                raise NoAdapter(f"user {user!r} has no adapter; upload one with PUT /v1/users/{user}/adapter, "
                                'or send "adapter": "none" to use the bare base explicitly')
            row = self.cache.get(rec.sha256)
            if row is not None:
                return row
            try:
                data = self.store.read(rec.sha256)
            except FileNotFoundError:
                continue
            _, row = self.validate(data, f"stored adapter of user {user!r}")
            row = _with_sha(row, rec.sha256)
            self.cache.put(rec.sha256, row)
            return row
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

    def score(self, ids: list[int], row: RowState, user: str = "", conn=None, logprobs: int | None = None) -> Future:
        """`conn`: the client's socket, if known (`hangup.conn_socket`): the engine drops the job if it closes.
        `logprobs` = k: also each token's logprob and the k most likely tokens at each position (`Scored`)."""
        if len(ids) < 2:
            raise SharedLLMError("text: nothing to score (need at least one token after the first)")
        return self.engine.submit(Job("score", ids, row, user, conn=conn, logprobs=logprobs))

    def generate(self, ids: list[int], row: RowState, max_tokens: int, temperature: float, seed, *, user: str = "",
                 top_p: float = 1.0, stop: tuple[str, ...] = (), on_text=None, conn=None,
                 logprobs: int | None = None, on_logprob=None, ignore_eos: bool = False) -> Future:
        if len(ids) + max_tokens > self.context_limit():
            raise SharedLLMError(f"prompt + max_tokens = {len(ids) + max_tokens} tokens is over the model's "
                                 f"context of {self.context_limit()}")
        if not ids:
            raise SharedLLMError("prompt: empty prompt on a tokenizer without a BOS token")
        return self.engine.submit(Job("generate", ids, row, user, max_tokens, temperature, seed, top_p,
                                      tuple(stop), on_text, conn, logprobs=logprobs, on_logprob=on_logprob,
                                      ignore_eos=ignore_eos))

    def stats(self) -> dict:
        return {**self.engine.stats(), "cache_entries": len(self.cache), "cache_bytes": self.cache.nbytes,
                "cache_capacity_bytes": self.cache.capacity, "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses, "cache_evictions": self.cache.evictions}


def _with_sha(row: RowState, sha256: str) -> RowState:
    return dataclasses.replace(row, sha256=sha256)


def _largest_adapter_bytes(model: RowModel) -> int:
    """The default upload limit: the largest adapter any served method takes on this base, as fp32, plus 1 MiB."""
    return 4 * max(kernel.max_numbers() for kernel in model.kernels.values()) + (1 << 20)


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


def lean_decoder(rgm: RowModel, decode: str, dtype: str):
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
