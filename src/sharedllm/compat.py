"""Calls into transformers and peft whose spelling changed inside the versions sharedllm supports (pyproject.toml:
transformers >= 4.46, < 6; peft >= 0.13, < 1), so that sharedllm's own calls raise no FutureWarning on the newest
and still run on the oldest.

- transformers renamed the forward's KV-cache argument `past_key_values` to `cache` (the installed 5.25 warns
  "`past_key_values` is deprecated and will be removed in version 5.40.0 ... Use `cache` instead"; releases
  before the rename know only `past_key_values`): pass the cache as `**cache_kwargs(model, cache)`.
- peft (0.21 and earlier) reads `model.is_gradient_checkpointing` in `PeftModel.__init__`, which transformers 5.x
  deprecated for `is_activation_checkpointing` (FutureWarning, removal in v6). The read is peft's, not ours, and
  peft behaves the same either way: build PEFT models inside `quiet_peft_checkpointing_probe()`, which silences
  exactly that warning and nothing else.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

CACHE_NAMES = ("cache", "past_key_values")  # newest first
PEFT_PROBE_WARNING = r"`is_gradient_checkpointing` is deprecated"


@functools.lru_cache(maxsize=None)
def _cache_name_of(cls) -> str | None:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in CACHE_NAMES if n in params), None)


def cache_kwarg(model=None) -> str:
    """The name the installed transformers gives the KV-cache argument of `model`'s forward: `cache` or
    `past_key_values`. A model whose forward names neither (a wrapper taking **kwargs) gets the one transformers'
    Llama takes."""
    if model is not None:
        name = _cache_name_of(model if isinstance(model, type) else type(model))
        if name is not None:
            return name
    from transformers import LlamaForCausalLM

    return _cache_name_of(LlamaForCausalLM) or "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{cache_kwarg(model): cache}, to splat into a forward call."""
    return {cache_kwarg(model): cache}


@contextlib.contextmanager
def quiet_peft_checkpointing_probe():
    """Silence the FutureWarning transformers raises when peft reads `is_gradient_checkpointing` (see the module
    docstring); every other warning passes as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_PROBE_WARNING, category=FutureWarning)
        yield
