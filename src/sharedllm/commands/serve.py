"""sharedllm serve: one base, every user's adapter (norm or LoRA), mixed-user batches, over HTTP (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..base import base_name, cache_dir, load_base
from ..log import say
from .args import add_base_args, positive_int

HELP = "serve many users from one base over HTTP: adapter store, per-user tokens, mixed-user batches"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number above 0")
    return value


def count_or_zero(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number, 0 or more")
    return int(text)


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
    p.add_argument("--max-rows-per-user", type=positive_int, default=None,
                   help="most decode rows (of --max-batch) one user's generations hold at once, so that another "
                        "user's request always finds a free row at the next admission; the user's other "
                        "generations wait in their queue, even when nobody else waits (default: half of "
                        "--max-batch, 8 of 16; give --max-batch's value to let one user fill the batch)")
    p.add_argument("--read-timeout-s", type=float, default=10.0,
                   help="longest wait for each chunk of a request body (a stalled upload gets 408)")
    p.add_argument("--body-timeout-s", type=positive_float, default=60.0,
                   help="longest time a whole request body may take after its head (a body that trickles in "
                        "gets 408 and the connection is closed; an upload of 30 MB needs 0.5 MB/s at 60 s)")
    p.add_argument("--header-timeout-s", type=positive_float, default=10.0,
                   help="longest time a request head may take after its first byte (else 408 and close)")
    p.add_argument("--keep-alive-s", type=positive_float, default=5.0,
                   help="a connection with no request in progress (just accepted, or after its last response) "
                        "is closed after this many seconds")
    p.add_argument("--max-connections", type=positive_int, default=1024,
                   help="most open connections per server process; beyond: JSON 503 with Retry-After, then close "
                        "(the open-file limit is raised to fit, or this is lowered to fit it)")
    p.add_argument("--max-connections-per-client", type=count_or_zero, default=64,
                   help="most open connections from one client address (the TCP peer: behind a reverse proxy, "
                        "every client is the proxy's address, so raise it or give 0 for no cap); beyond: 503")
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


def limits(args):
    """The connection limits of `sharedllm.serve.protocol` from the command line (defaults where not given)."""
    from ..serve.protocol import Limits

    d = Limits()
    return Limits(keep_alive_s=getattr(args, "keep_alive_s", d.keep_alive_s),
                  header_timeout_s=getattr(args, "header_timeout_s", d.header_timeout_s),
                  body_timeout_s=getattr(args, "body_timeout_s", d.body_timeout_s),
                  max_connections=getattr(args, "max_connections", d.max_connections),
                  max_connections_per_client=getattr(args, "max_connections_per_client",
                                                     d.max_connections_per_client))


def _app(args):
    from ..serve import build
    from ..serve.protocol import fit_fd_limit

    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    store = store_dir(args)
    conn_limits, note = fit_fd_limit(limits(args))
    if note:
        say(note)
    app, router, where = build(base, store, window_s=args.batch_window_ms / 1000, max_batch=args.max_batch,
                               cache_bytes=args.cache_mb << 20, max_adapter_bytes=args.max_adapter_bytes,
                               max_batch_tokens=args.max_batch_tokens, read_timeout_s=args.read_timeout_s,
                               max_queued_per_user=args.max_queued_per_user,
                               decode=getattr(args, "decode", "lean"),
                               decode_dtype=getattr(args, "decode_dtype", "fp32"),
                               prefill_budget=getattr(args, "prefill_budget", 512),
                               max_rows_per_user=getattr(args, "max_rows_per_user", None), limits=conn_limits)
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

    from ..serve.protocol import PROTOCOL, accept_backlog

    if args.workers > 1:
        return _run_workers(args)
    app, router, where, store, base = _app(args)
    swept = router.store.swept
    say(f"store {store}: {router.store.count()} adapters; swept {len(swept.get('temp_files', []))} temp and "
        f"{len(swept.get('orphan_files', []))} orphan files")
    say(f"admin token: {where} (not printed)")
    say(f"listening on http://{args.host}:{args.port} (OpenAPI schema at /openapi.json)")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=PROTOCOL,
                    backlog=accept_backlog(app.state.connection_limits))
    finally:
        router.close()
        router.store.close()
    return {"ok": True, "store": str(store), "base": base.name}


def _run_workers(args) -> dict:
    import json
    import os

    import uvicorn

    from ..serve.protocol import PROTOCOL, accept_backlog
    from ..store import admin_token

    store = store_dir(args)
    _, where = admin_token(store)  # create it once, before the workers race for it
    args.store = str(store)
    os.environ[WORKER_ENV] = json.dumps({k: v for k, v in vars(args).items() if _plain(v)})
    say(f"admin token: {where} (not printed)")
    say(f"{args.workers} workers on http://{args.host}:{args.port}, one store {store}")
    uvicorn.run("sharedllm.commands.serve:worker_app", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level="info", http=PROTOCOL, backlog=accept_backlog(limits(args)),
                **_healthcheck(uvicorn))
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
