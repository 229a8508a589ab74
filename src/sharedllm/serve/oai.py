"""The OpenAI-compatible endpoints: `POST /v1/completions` and `POST /v1/chat/completions`, plain or streamed.

Chat messages are rendered with the base's own chat template (`tokenizer.apply_chat_template`); a tokenizer
without one (the byte tokenizer of the tiny test base) uses `SIMPLE_TEMPLATE`. Streams are server-sent events
in OpenAI's chunk format ending with `data: [DONE]`. Both routes check the token first, then read the body
through `bodies` (size limit, read timeout, strict JSON) into the strict request models below, like every other
route of the server. A client that goes away (plain or streamed) has its
request cancelled; the engine drops the row at its next decode step. The engine also polls each request's
socket (`hangup`; the app's middleware puts it in the scope as `CONN`) at every step, so a closed connection
frees its row at the next step even when the event loop is slow to deliver `http.disconnect`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, field_validator
from starlette.concurrency import run_in_threadpool

from ..errors import SharedLLMError

MAX_STOP, MAX_STOP_CHARS = 4, 64


# Strict per field (no coercion, as OpenAI's API): an integer field refuses strings, booleans and floats (5.0), a
# float field strings and booleans (an integer is fine), a boolean field anything but true or false.
class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    max_tokens: StrictInt | None = Field(None, ge=1, le=1024, description="default 16 (completions), 256 (chat)")
    temperature: StrictFloat = Field(1.0, ge=0.0, le=5.0, allow_inf_nan=False, description="0 = greedy")
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="nucleus sampling mass")
    n: StrictInt = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the text ends before the first")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 64, description="sampling seed, 0 <= seed < 2**64")
    user: str | None = Field(None, max_length=64, description="if given, must be the authenticated user")
    model: str | None = Field(None, max_length=256)
    adapter: Literal["user", "none"] = Field("user", description='"none" = the bare base, explicitly')

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops


class Completion(Sampling):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Chat(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=1024, description="the newer name of max_tokens")


SIMPLE_TEMPLATE = "<|{role}|>\n{content}\n"  # ... then "<|assistant|>\n" (bases without a chat template)


def chat_ids(router, messages: list[Message]) -> list[int]:
    """The prompt tokens of a chat, through the base's own template."""
    from .router import TooLarge

    tok = router.base.tokenizer
    if sum(len(m.content.encode("utf-8", "surrogatepass")) for m in messages) > router.max_text_bytes:
        raise TooLarge(f"messages: over {router.max_text_bytes} bytes, more than the model's context of "
                       f"{router.context_limit()} tokens can hold")
    msgs = [m.model_dump() for m in messages]
    hf = getattr(tok, "hf", None)
    if hf is not None and getattr(hf, "chat_template", None):
        text = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = hf.encode(text, add_special_tokens=False)
    else:
        text = "".join(SIMPLE_TEMPLATE.format(**m) for m in msgs) + "<|assistant|>\n"
        ids = ([tok.bos_id] if getattr(tok, "bos_id", None) is not None else []) + tok.encode(text)
    if len(ids) > router.context_limit():
        raise SharedLLMError(f"messages: {len(ids)} tokens is over the model's context of {router.context_limit()}")
    return ids


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


CONN = "sharedllm.conn"  # scope key: the client's socket (or None), for the engine's hang-up poll


def conn_of(request: Request):
    return request.scope.get(CONN)


async def wait_for(fut, request: Request, router):
    """The engine's result, or None if the client disconnects first (the request is then cancelled, here or
    already by the engine, which saw the connection close)."""
    done = asyncio.wrap_future(fut)
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        gone.cancel()
        return None if done.cancelled() else done.result()
    fut.cancel()
    router.engine.wake()
    return None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Call:
    """One completion or chat request on its way through the engine."""

    def __init__(self, router, who: str, body: Sampling, ids: list[int], chat: bool, gains, conn=None):
        self.router, self.who, self.body, self.ids, self.chat, self.gains = router, who, body, ids, chat, gains
        self.conn = conn
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = body.model or router.base.name
        default = 256 if chat else 16
        self.max_tokens = (getattr(body, "max_completion_tokens", None) if chat else None) or body.max_tokens or default

    def start(self, on_text=None):
        b = self.body
        return self.router.generate(self.ids, self.gains, self.max_tokens,
                                    b.temperature, b.seed, user=self.who, top_p=b.top_p, stop=tuple(b.stop or ()),
                                    on_text=on_text, conn=self.conn)

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def head(self) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "created": self.created, "model": self.model, "object": obj}

    def choice(self, text: str, finish) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def chunk(self, text: str | None, finish=None, first: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self.head(), "object": "chat.completion.chunk", "choices": [choice]}
        return {**self.head(), "choices": [{"index": 0, "text": text or "", "finish_reason": finish,
                                            "logprobs": None}]}

    def reply(self, out) -> dict:
        return {**self.head(), "user": self.who, "adapter": self.body.adapter,
                "choices": [self.choice(out.text, out.finish_reason)], "usage": self.usage(len(out.ids))}

    def stream(self) -> StreamingResponse:
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        fut = self.start(on_text=lambda piece: loop.call_soon_threadsafe(q.put_nowait, piece))
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(q.put_nowait, None))
        usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        return StreamingResponse(self._events(fut, q, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, fut, q: asyncio.Queue, include_usage: bool):
        try:
            if self.chat:
                yield _sse(self.chunk("", first=True))
            while (piece := await q.get()) is not None:
                yield _sse(self.chunk(piece))
            if fut.cancelled():  # the engine saw the connection close: nobody reads the rest
                return
            try:
                out = fut.result()
            except Exception as e:  # this request failed mid-stream: say so in the stream
                yield _sse({"error": {"message": str(e), "type": type(e).__name__}})
            else:
                yield _sse(self.chunk(None, out.finish_reason))
                if include_usage:
                    yield _sse({**self.head(), "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "choices": [], "usage": self.usage(len(out.ids))})
            yield "data: [DONE]\n\n"
        finally:
            if not fut.done():  # the client went away: free the row at the next decode step
                fut.cancel()
                self.router.engine.wake()


def add_openai_routes(app: FastAPI, router, caller, http_error, body_of) -> None:
    """`body_of(request, model)`: the app's body reader (limits, timeout, strict JSON, 4xx on bad input)."""
    from .bodies import schema_of

    async def run(request: Request, model, chat: bool):
        caller(request, None)  # the token before the body
        body = await body_of(request, model)
        who = caller(request, body.user)
        try:
            ids = chat_ids(router, body.messages) if chat else router.prompt_ids(body.prompt, "prompt")
            gains = await run_in_threadpool(router.row_for, who, body.adapter)
            call = Call(router, who, body, ids, chat, gains, conn_of(request))
            if body.stream:
                return call.stream()
            fut = call.start()
            out = await wait_for(fut, request, router)
        except SharedLLMError as e:
            raise http_error(e) from None
        if out is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        return call.reply(out)

    @app.post("/v1/completions", openapi_extra=schema_of(Completion))
    async def completions(request: Request):
        return await run(request, Completion, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schema_of(Chat))
    async def chat_completions(request: Request):
        return await run(request, Chat, chat=True)
