"""Request bodies, read defensively: a size limit checked from Content-Length and again while the body streams
in (before anything is parsed), a read timeout per chunk (a client that declares more than it sends is cut
off; the whole body's deadline is the protocol's, `protocol.Limits.body_timeout_s`), strict JSON (no NaN/Infinity,
no duplicate keys, valid UTF-8 with no lone surrogates) and a pydantic model whose errors come back as a 422 that
is itself valid JSON (the offending input is never echoed)."""
from __future__ import annotations

import asyncio

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

from ..errors import SharedLLMError
from ..wire import strict_json


async def read_body(request: Request, limit: int, what: str, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"{what}: body of {declared[:20]!r} bytes; this server's limit is {limit}")
    chunks, size, stream = [], 0, request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPException(408, f"{what}: body not received within {timeout_s:g} s",
                                headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{what}: body over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_text(value, path: str = "body") -> None:
    """Refuse strings that are not valid Unicode text (lone surrogates cannot be encoded as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPException(400, f"{path}: invalid Unicode (a lone surrogate such as \\ud800)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, path)
            _check_text(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


def parse_model(model: type[BaseModel], raw: bytes):
    """Strict JSON bytes -> an instance of `model`; 400 for bad JSON or text, 422 for bad fields."""
    try:
        obj = strict_json(raw, "body")
    except SharedLLMError as e:
        raise HTTPException(400, str(e)) from None
    try:
        _check_text(obj)
    except RecursionError:
        raise HTTPException(400, "body: nested too deeply") from None
    if not isinstance(obj, dict):
        raise HTTPException(422, f"body must be a JSON object, not {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise HTTPException(422, e.errors(include_url=False, include_context=False, include_input=False)) from None


def schema_of(model: type[BaseModel]) -> dict:
    """openapi_extra documenting a JSON body that the endpoint reads itself (after checking the token)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
