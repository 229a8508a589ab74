"""The HTTP layer: decode the request, ask the router, encode the response. No model code lives here.

Auth: `Authorization: Bearer <token>`. The admin token creates users; each user token may upload, replace,
read the metadata of, use and delete only that user's adapter (the admin may also read or delete any adapter,
for revocation). Missing or unknown token -> 401, someone else's adapter -> 403, no adapter -> 404.
"""
from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import SharedLLMError
from .router import NoAdapter, Router, TooLarge

USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ADMIN = "<admin>"


class NewUser(BaseModel):
    user: str = Field(description="user name: letters, digits, _ . @ -, at most 64 characters")


class Completion(BaseModel):
    prompt: str
    max_tokens: int = Field(16, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 = greedy")
    user: str | None = Field(None, description="if given, must be the authenticated user")
    seed: int | None = None
    model: str | None = None
    adapter: Literal["user", "none"] = Field("user", description='"none" = the bare base, explicitly')


class Score(BaseModel):
    text: str
    user: str | None = None
    adapter: Literal["user", "none"] = "user"


def _http(e: SharedLLMError) -> HTTPException:
    status = 404 if isinstance(e, NoAdapter) else 413 if isinstance(e, TooLarge) else 400
    return HTTPException(status, str(e))


def _found(rec, user: str):
    if rec is None:
        raise HTTPException(404, f"user {user!r} has no adapter")
    return rec


def create_app(router: Router, admin_token: str) -> FastAPI:
    app = FastAPI(title="sharedllm", version=__version__,
                  description="One frozen base, one norm adapter per user, mixed-user batches.")
    store = router.store

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

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "base": router.base.name, "base_fingerprint": router.base.fingerprint,
                "adapters": store.count(), **router.stats()}

    @app.post("/v1/users", status_code=201)
    def create_user(body: NewUser, request: Request) -> dict:
        if principal(request) != ADMIN:
            raise HTTPException(403, "only the admin token can create users")
        if not USER_NAME.match(body.user):
            raise HTTPException(400, f"user name {body.user!r}: use 1-64 letters, digits, _ . @ -")
        try:
            return {"user": body.user, "token": store.create_user(body.user)}
        except SharedLLMError as e:
            raise HTTPException(409, str(e)) from None

    @app.put("/v1/users/{user}/adapter", openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_adapter(user: str, request: Request) -> dict:
        owner(request, user, admin_ok=False)
        data = await _read_limited(request, router.max_adapter_bytes)
        try:
            rec = await run_in_threadpool(router.upload, user, data)
        except SharedLLMError as e:
            raise _http(e) from None
        return rec.to_json()

    @app.get("/v1/users/{user}/adapter")
    def get_adapter(user: str, request: Request) -> dict:
        owner(request, user)
        rec = _found(store.get(user), user)
        return {**rec.to_json(), "meta": router.file_meta(rec.sha256)}

    @app.delete("/v1/users/{user}/adapter")
    def delete_adapter(user: str, request: Request) -> dict:
        owner(request, user)
        rec = _found(store.delete(user), user)
        return {"user": user, "deleted": rec.sha256}

    @app.post("/v1/completions")
    async def completions(body: Completion, request: Request) -> dict:
        who = caller(request, body.user)
        try:
            ids = router.prompt_ids(body.prompt, "prompt")
            fut = router.generate(ids, router.gains_for(who, body.adapter), body.max_tokens, body.temperature,
                                  body.seed)
            out = await asyncio.wrap_future(fut)
        except SharedLLMError as e:
            raise _http(e) from None
        text = router.base.tokenizer.decode(out.ids)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or router.base.name, "user": who, "adapter": body.adapter,
                "choices": [{"index": 0, "text": text, "finish_reason": out.finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.ids),
                          "total_tokens": len(ids) + len(out.ids)}}

    @app.post("/v1/score")
    async def score(body: Score, request: Request) -> dict:
        who = caller(request, body.user)
        try:
            fut = router.score(router.prompt_ids(body.text, "text"), router.gains_for(who, body.adapter))
            out = await asyncio.wrap_future(fut)
        except SharedLLMError as e:
            raise _http(e) from None
        return {"logprob": out.logprob, "tokens": out.tokens, "ppl": _ppl(out.logprob, out.tokens),
                "user": who, "adapter": body.adapter}

    return app


def _ppl(logprob: float, tokens: int) -> float:
    return math.exp(-logprob / tokens)


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"adapter upload: {declared} bytes is over this server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"adapter upload: over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
