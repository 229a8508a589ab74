"""sharedllm serve: one base, every user's adapter (norm or LoRA), mixed-user batches, over HTTP (FastAPI + uvicorn)."""
from __future__ import annotations

from pathlib import Path

from ..base import base_name, cache_dir, load_base
from ..log import say
from .args import add_base_args, positive_int

HELP = "serve many users from one base over HTTP: adapter store, per-user tokens, mixed-user batches"


def configure(p) -> None:
    add_base_args(p)
    p.add_argument("--store", default=None, help="adapter store folder (default: ~/.cache/sharedllm/store-<base>)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="when the engine is idle, how long a first request waits for others to share its pass")
    p.add_argument("--max-batch", type=positive_int, default=16,
                   help="most rows decoding at once (continuous batching) and most scores in one pass")
    p.add_argument("--max-batch-tokens", type=positive_int, default=16384,
                   help="most padded positions in one batch (bounds the memory of the logits)")
    p.add_argument("--prefill-budget", type=positive_int, default=512,
                   help="most padded prompt positions admitted between two decode steps: a burst of prompts joins "
                        "over several steps, so a score or a running stream waits for at most this much prefill")
    p.add_argument("--cache-mb", type=positive_int, default=1024,
                   help="decoded adapters kept in memory, LRU, bounded in MB of their fp32 tensors (a norm adapter "
                        "of the default base is 0.14 MB, a LoRA-r4 4.9 MB; the 0.5B base: 0.18 and 8.8 MB)")
    p.add_argument("--max-queued-per-user", type=positive_int, default=32,
                   help="requests one user may have queued or running; beyond: HTTP 429 with Retry-After")
    p.add_argument("--read-timeout-s", type=float, default=10.0,
                   help="longest wait for each chunk of a request body (a stalled upload gets 408)")
    p.add_argument("--max-adapter-bytes", type=int, default=None,
                   help="upload size limit (default: the largest adapter a served method takes on this base as "
                        "fp32, LoRA at rank 16 on every decoder linear, + 1 MiB)")
    p.add_argument("--decode", choices=["lean", "hf"], default="lean",
                   help="decode step: lean (sharedllm.serve.fastdecode: preallocated KV, no HF forward; Llama and "
                        "Qwen2, other bases fall back to hf) or hf (the transformers forward)")
    p.add_argument("--decode-dtype", choices=["fp32", "bf16", "int8", "int4", "int8-head4", "int4-head8"],
                   default="fp32",
                   help="weights of the lean decode step's matmuls: fp32 (exact), a bf16 copy, int8 per output "
                        "channel, int4 per group of 32 inputs (fastest for one stream, least exact), or a mix: "
                        "int4-head8 (int4 layers, int8 head: llama.cpp Q4_1's own mix; near int4's speed, logits "
                        "near int8's) or int8-head4 (int8 layers, int4 head); all but fp32 are not exact (logits "
                        "move, see docs/BENCHMARKS.md); norms, per-user gains, prefill and scores stay fp32")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes on one port and one store (each loads the base; memory x N)")


WORKER_ENV = "SHAREDLLM_SERVE_WORKER"


def store_dir(args) -> Path:
    """--store, or ~/.cache/sharedllm/store-<base name>: the same folder for one worker and for --workers N."""
    return Path(args.store) if args.store else cache_dir() / f"store-{base_name(args.base)}"


def _app(args):
    from ..serve import build

    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    store = store_dir(args)
    app, router, where = build(base, store, window_s=args.batch_window_ms / 1000, max_batch=args.max_batch,
                               cache_bytes=args.cache_mb << 20, max_adapter_bytes=args.max_adapter_bytes,
                               max_batch_tokens=args.max_batch_tokens, read_timeout_s=args.read_timeout_s,
                               max_queued_per_user=args.max_queued_per_user,
                               decode=getattr(args, "decode", "lean"),
                               decode_dtype=getattr(args, "decode_dtype", "fp32"),
                               prefill_budget=getattr(args, "prefill_budget", 512))
    return app, router, where, store, base


def worker_app():
    """uvicorn's app factory for `--workers N`: each worker process builds its own app from the parent's args."""
    import argparse
    import json
    import os

    app, router, *_ = _app(argparse.Namespace(**json.loads(os.environ[WORKER_ENV])))

    @app.on_event("shutdown")
    def _close() -> None:
        router.close()
        router.store.close()

    return app


def run(args) -> dict:
    import uvicorn

    from ..serve.protocol import PROTOCOL

    if args.workers > 1:
        return _run_workers(args)
    app, router, where, store, base = _app(args)
    swept = router.store.swept
    say(f"store {store}: {router.store.count()} adapters; swept {len(swept.get('temp_files', []))} temp and "
        f"{len(swept.get('orphan_files', []))} orphan files")
    say(f"admin token: {where} (not printed)")
    say(f"listening on http://{args.host}:{args.port} (OpenAPI schema at /openapi.json)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=PROTOCOL)
    finally:
        router.close()
        router.store.close()
    return {"ok": True, "store": str(store), "base": base.name}


def _run_workers(args) -> dict:
    import json
    import os

    import uvicorn

    from ..serve.protocol import PROTOCOL
    from ..store import admin_token

    store = store_dir(args)
    _, where = admin_token(store)  # create it once, before the workers race for it
    args.store = str(store)
    os.environ[WORKER_ENV] = json.dumps({k: v for k, v in vars(args).items() if _plain(v)})
    say(f"admin token: {where} (not printed)")
    say(f"{args.workers} workers on http://{args.host}:{args.port}, one store {store}")
    uvicorn.run("sharedllm.commands.serve:worker_app", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level="info", http=PROTOCOL, **_healthcheck(uvicorn))
    return {"ok": True, "store": str(store), "base": args.base}


WORKER_HEALTHCHECK_S = 300  # a worker imports torch and loads the base before it answers: minutes on a busy machine


def _healthcheck(uvicorn) -> dict:
    """uvicorn's supervisor gives a worker 5 s (its default) to start and to answer each liveness ping, then kills
    and restarts it: on a loaded machine a worker still importing torch was restarted over and over. uvicorn
    versions with the setting get WORKER_HEALTHCHECK_S."""
    import inspect

    has = "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters
    return {"timeout_worker_healthcheck": WORKER_HEALTHCHECK_S} if has else {}


def _plain(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def render(r: dict) -> str:
    return f"server stopped (store {r['store']}, base {r['base']})"
