"""The HTTP layer: decode the request, ask the router, encode the response. No model code lives here.

Every request is checked in this order: token (from the headers only), body size (Content-Length, then while
streaming), strict JSON, the request model; only then does it reach the router. Bad input is a 4xx with a JSON
body; a request whose client disconnects is cancelled (see scheduler), and the engine also polls the request's
socket (`hangup`; the outermost middleware puts it in the scope) so that a closed connection frees its row at
the next decode step.

Auth: `Authorization: Bearer <token>`. The admin token creates users; each user token may upload, replace,
read the metadata of, use and delete only that user's adapter (the admin may also read or delete any adapter,
for revocation). Missing or unknown token -> 401, someone else's adapter -> 403, no adapter -> 404.
`GET /v1/users` (read-only) lists users, their adapters and cache state: all for the admin, one's own row for a
user token. `/` serves the browser playground (`playground`), which uses only these routes.
"""
from __future__ import annotations

import math
import re
import secrets
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import SharedLLMError
from .bodies import parse_model, read_body, schema_of
from .hangup import conn_socket
from .oai import CONN, add_openai_routes, conn_of, wait_for
from .playground import add_playground_routes
from .router import Busy, NoAdapter, Router, TooLarge

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # fullmatch: "ann\n" is not a name
ADMIN = "<admin>"
SMALL_BODY = 4096  # /v1/users
NAME = Field(None, max_length=64, description="if given, must be the authenticated user")


class NewUser(BaseModel):
    user: str = Field(max_length=256, description="user name: letters, digits, _ . @ -, at most 64 characters")


class Score(BaseModel):
    text: str
    user: str | None = NAME
    adapter: Literal["user", "none"] = "user"


def _http(e: SharedLLMError) -> HTTPException:
    if isinstance(e, Busy):
        return HTTPException(429, str(e), headers={"Retry-After": "1"})
    status = 404 if isinstance(e, NoAdapter) else 413 if isinstance(e, TooLarge) else 400
    return HTTPException(status, str(e))


def _found(rec, user: str):
    if rec is None:
        raise HTTPException(404, f"user {user!r} has no adapter")
    return rec


def _current_adapter(router: Router, user: str, tries: int = 5) -> dict:
    """The user's record with its file's metadata. A replace (or delete) by another worker or process may unlink the
    file between the index read and the file read: read the user's current record again, then 404."""
    for _ in range(tries):
        rec = _found(router.store.get(user), user)
        try:
            return {**rec.to_json(), "meta": router.file_meta(rec.sha256)}
        except FileNotFoundError:
            continue
    raise HTTPException(404, f"user {user!r}: the adapter changed while it was being read; retry")


def create_app(router: Router, admin_token: str, read_timeout_s: float = 10.0) -> FastAPI:
    app = FastAPI(title="sharedllm", version=__version__,
                  description="One frozen base, one norm adapter per user, mixed-user batches.",
                  redirect_slashes=False)  # "/v1/completions/" is a JSON 404, not a 307 to the route
    store = router.store
    text_body = router.max_text_bytes * 6 + 65536  # JSON may escape each byte as \u00XX

    async def body(request: Request, model, limit: int, what: str):
        return parse_model(model, await read_body(request, limit, what, read_timeout_s))

    async def body_of(request: Request, model):
        return await body(request, model, text_body, request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        # A bug, not a refusal: the client still gets a JSON body (never a traceback); the server log keeps the
        # traceback, and only this request fails (a failing row is resolved with its own error by the engine).
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        # Expected, not a bug: the client hung up before its body was in. Nobody reads this; nothing to log.
        return Response(status_code=499)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        router.metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    class ConnSocket:  # outermost: it sees the server's own `receive`, before any middleware wraps it
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                names = {k for k, _ in scope["headers"]}
                if b"transfer-encoding" in names and b"content-length" in names:  # a smuggling shape (RFC 9112 6.1)
                    return await JSONResponse({"detail": "request has both Transfer-Encoding and Content-Length"},
                                              status_code=400, headers={"Connection": "close"})(scope, receive, send)
                scope[CONN] = conn_socket(receive)
            await self.app(scope, receive, send)

    app.add_middleware(ConnSocket)

    def principal(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if secrets.compare_digest(token.encode(), admin_token.encode()):
            return ADMIN
        user = store.user_for_token(token)
        if user is None:
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        return user

    def owner(request: Request, user: str, admin_ok: bool = True) -> str:
        who = principal(request)
        if who == ADMIN and admin_ok:
            if not store.user_exists(user):
                raise HTTPException(404, f"no user {user!r}")
            return who
        if who != user:
            raise HTTPException(403, f"this token belongs to {who!r}; it cannot touch the adapter of {user!r}")
        return who

    def caller(request: Request, claimed: str | None) -> str:
        who = principal(request)
        if who == ADMIN:
            raise HTTPException(403, "the admin token manages users; use a user token to run the model")
        if claimed is not None and claimed != who:
            raise HTTPException(403, f"field user={claimed!r} does not match the authenticated user {who!r}")
        return who

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        if principal(request) != ADMIN:
            raise HTTPException(403, "metrics need the admin token")
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "base": router.base.name, "base_fingerprint": router.base.fingerprint,
                "adapters": store.count(), **router.stats()}

    @app.post("/v1/users", status_code=201, openapi_extra=schema_of(NewUser))
    async def create_user(request: Request) -> dict:
        if principal(request) != ADMIN:
            raise HTTPException(403, "only the admin token can create users")
        new = await body(request, NewUser, SMALL_BODY, "new user")
        if not USER_NAME.fullmatch(new.user):
            raise HTTPException(400, f"user name {new.user[:80]!r}: use 1-64 letters, digits, _ . @ -")
        try:
            return {"user": new.user, "token": store.create_user(new.user)}
        except SharedLLMError as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/v1/users")
    def list_users(request: Request) -> dict:
        """Read-only: each user (by name, the first `?limit=`, default 1000, at most 10000), their adapter's method,
        scheme, size and whether its packed row state is in this process's cache; a user token sees only its own
        row. The token is checked before the query."""
        who = principal(request)
        raw = request.query_params.get("limit", "1000")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 10000):
            raise HTTPException(422, "limit: an integer from 1 to 10000")
        limit = int(raw)
        rows, total = store.users(limit, only=None if who == ADMIN else who)
        users = [{"user": name, "created": created,
                  "adapter": None if rec is None else {
                      "method": rec.meta.get("method"), "scheme": rec.meta.get("scheme"),
                      "params": rec.meta.get("params"), "bytes": rec.bytes, "sha256": rec.sha256,
                      "updated": rec.updated, "cached": rec.sha256 in router.cache}}
                 for name, created, rec in rows]
        return {"users": users, "total": total, "admin": who == ADMIN}

    @app.put("/v1/users/{user}/adapter", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_adapter(user: str, request: Request) -> dict:
        owner(request, user, admin_ok=False)
        data = await read_body(request, router.max_adapter_bytes, "adapter upload", read_timeout_s)
        try:
            rec = await run_in_threadpool(router.upload, user, data)
        except SharedLLMError as e:
            raise _http(e) from None
        return rec.to_json()

    @app.put("/v1/shared/{sha256}", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_shared(sha256: str, request: Request) -> dict:
        """Admin: a file users' adapters name by sha256: the shared bases of jointly compressed LoRAs (`compress
        --joint`) or a group adapter (`adapt --on-top`); the users' files naming it can be uploaded after."""
        if principal(request) != ADMIN:
            raise HTTPException(403, "only the admin token can store shared files")
        data = await read_body(request, router.max_shared_bytes, "shared file upload", read_timeout_s)
        try:
            return await run_in_threadpool(router.put_shared, sha256, data)
        except SharedLLMError as e:
            raise _http(e) from None

    @app.get("/v1/users/{user}/adapter")
    def get_adapter(user: str, request: Request) -> dict:
        owner(request, user)
        return _current_adapter(router, user)

    @app.delete("/v1/users/{user}/adapter")
    def delete_adapter(user: str, request: Request) -> dict:
        owner(request, user)
        rec = _found(store.delete(user), user)
        return {"user": user, "deleted": rec.sha256}

    add_openai_routes(app, router, caller, _http, body_of)
    add_playground_routes(app)

    @app.post("/v1/score", openapi_extra=schema_of(Score))
    async def score(request: Request):
        caller(request, None)
        body = await body_of(request, Score)
        who = caller(request, body.user)
        try:
            ids = router.prompt_ids(body.text, "text")
            gains = await run_in_threadpool(router.row_for, who, body.adapter)
            out = await wait_for(router.score(ids, gains, who, conn_of(request)), request, router)
        except SharedLLMError as e:
            raise _http(e) from None
        if out is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        if not math.isfinite(out.logprob):
            raise HTTPException(422, "text: its log-probability under this adapter is not a finite number")
        return {"logprob": out.logprob, "tokens": out.tokens, "ppl": _ppl(out.logprob, out.tokens),
                "user": who, "adapter": body.adapter}

    return app


def _ppl(logprob: float, tokens: int) -> float | None:
    """exp(mean negative log-probability), or None where that is beyond a float (mean NLL > 700 nats)."""
    nll = -logprob / tokens
    return math.exp(nll) if nll <= 700 else None
