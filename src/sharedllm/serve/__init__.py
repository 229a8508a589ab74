"""The multi-user server (its per-row forward is `sharedllm.adapters.rows`): `compute` (batched scoring,
prefill and the HF decode step), `fastdecode` (the lean decode step and its KV buffer, Llama/Qwen2), `kv` (the
running batch's KV cache on the HF path), `scheduler` (continuous batching, fair admission), `textstream` (stop
strings on decoded text), `router` (user -> row state, LRU in bytes), `oai` (OpenAI-compatible completions and chat,
streaming), `metrics` (Prometheus), `app` (the FastAPI layer). `build` wires them up."""
from __future__ import annotations

from ..arch import Base
from ..store import AdapterStore, admin_token


def build(base: Base, store_dir, read_timeout_s: float = 10.0, limits=None, **router_kwargs):
    """(FastAPI app, router, where the admin token comes from) for `base` and the store at `store_dir`;
    `read_timeout_s` bounds the wait for each chunk of a request body; `limits` (a `protocol.Limits`, default
    its defaults) are the connection timeouts and caps that `protocol.JsonH11Protocol` reads from the app."""
    from .app import create_app
    from .metrics import ServeMetrics
    from .protocol import Limits
    from .router import Router

    store = AdapterStore(store_dir)
    token, where = admin_token(store_dir)
    metrics = ServeMetrics()
    router = Router(base, store, metrics=metrics, **router_kwargs)
    metrics.watch(router)
    app = create_app(router, token, read_timeout_s)
    app.state.connection_limits = limits or Limits()
    return app, router, where


def wait_until_healthy(url: str, proc=None, timeout: float = 120.0) -> bool:
    """Poll `url`/health until it answers 200 (True), `proc` (a Popen) exits, or `timeout` passes (False)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False
