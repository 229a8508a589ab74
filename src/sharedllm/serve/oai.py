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
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from ..errors import SharedLLMError
from .logprobs import MAX_K, Offsets, logprobs_obj, names_for

MAX_STOP, MAX_STOP_CHARS = 4, 64
MAX_PROMPTS = 16  # prompts in one completions request (each one choice; with echo + logprobs, two engine jobs)


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
    ignore_eos: StrictBool = Field(False, description="vLLM's extension: keep generating past the end-of-text token "
                                                      "until max_tokens or a stop string (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops


class Completion(Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=f"a text, a list of up to {MAX_PROMPTS} texts, token ids, or a list of token-id lists (ids are "
                    "run as given: no BOS is added to them); one choice per prompt, in order")
    max_tokens: StrictInt | None = Field(None, ge=0, le=1024,
                                         description="default 16; 0 (with echo) scores the prompt only")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_K, description=(
        "k: each token's logprob and the k most likely tokens at each position, under the model's own distribution "
        "(the user's adapter; before temperature and top_p)"))
    echo: StrictBool = Field(False, description="prepend the prompt's text (and with logprobs its tokens' logprobs)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and (not v or not isinstance(v[0], int)):
            if not v or len(v) > MAX_PROMPTS:
                raise ValueError(f"prompt: a list of 1 to {MAX_PROMPTS} prompts")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("prompt: an empty list of token ids")
        return v

    @model_validator(mode="after")
    def _score_only(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (it returns the prompt and, with logprobs, its scores)")
        return self


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


def completion_prompts(router, prompt) -> list[tuple[list[int], str, int]]:
    """Each prompt of a completions request as (the ids the model runs, its text, how many leading ids are not
    echoed: the BOS the server puts before a text prompt, which is not part of the text)."""
    tok = router.base.tokenizer
    single = isinstance(prompt, str) or isinstance(prompt[0], int)
    out = []
    for p in [prompt] if single else prompt:
        if isinstance(p, str):
            ids = router.prompt_ids(p, "prompt")
            out.append((ids, p, 1 if ids and ids[0] == getattr(tok, "bos_id", None) else 0))
            continue
        vocab = router.base.model.get_input_embeddings().num_embeddings
        if any(not 0 <= t < vocab for t in p):
            raise SharedLLMError(f"prompt: token ids must be in [0, {vocab}) for this base")
        if len(p) > router.context_limit():
            raise SharedLLMError(f"prompt: {len(p)} tokens is over the model's context of {router.context_limit()}")
        out.append((list(p), tok.decode(p), 0))
    return out


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


CONN = "sharedllm.conn"  # scope key: the client's socket (or None), for the engine's hang-up poll


def conn_of(request: Request):
    return request.scope.get(CONN)


async def wait_all(futs: list, request: Request, router) -> bool:
    """True once every one of a request's engine futures is done; False if the client disconnects first or the
    engine dropped one (it saw the connection close): then they are all cancelled."""
    if not futs:
        return True
    done = asyncio.ensure_future(asyncio.wait([asyncio.wrap_future(f) for f in futs]))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if done.done() and not any(f.cancelled() for f in futs):
        return True
    for f in futs:
        f.cancel()
    router.engine.wake()
    return False


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
    """One prompt of a completion or chat request on its way through the engine (a completions request with a list
    of prompts has one Call per prompt, each its own choice)."""

    def __init__(self, router, who: str, body: Sampling, ids: list[int], chat: bool, gains, conn=None,
                 index: int = 0, text: str = "", skip: int = 0):
        self.router, self.who, self.body, self.ids, self.chat, self.gains = router, who, body, ids, chat, gains
        self.conn, self.index, self.prompt_text, self.skip = conn, index, text, skip
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = body.model or router.base.name
        if chat:
            self.max_tokens = body.max_completion_tokens or body.max_tokens or 256
        else:
            self.max_tokens = 16 if body.max_tokens is None else body.max_tokens
        self.k = None if chat else body.logprobs  # completions only
        self.echo = not chat and body.echo
        self.gen = self.scored = None  # the engine futures: the generation, the echoed prompt's scores

    def start(self, on_text=None, on_logprob=None) -> list:
        """Submit this prompt's jobs: a score of the prompt (echo with logprobs), a generation (max_tokens > 0)."""
        b, futs = self.body, []
        try:
            if self.echo and self.k is not None and len(self.ids) >= 2:
                self.scored = self.router.score(self.ids, self.gains, self.who, self.conn, logprobs=self.k)
                futs.append(self.scored)
            if self.max_tokens > 0:
                self.gen = self.router.generate(self.ids, self.gains, self.max_tokens, b.temperature, b.seed,
                                                user=self.who, top_p=b.top_p, stop=tuple(b.stop or ()),
                                                ignore_eos=b.ignore_eos, on_text=on_text, conn=self.conn,
                                                logprobs=self.k, on_logprob=on_logprob)
                futs.append(self.gen)
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        return futs

    def futures(self) -> list:
        return [f for f in (self.scored, self.gen) if f is not None]

    def out(self):
        return self.gen.result() if self.gen is not None else None

    def completion_tokens(self) -> int:
        out = self.out()
        return len(out.ids) if out is not None else 0

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def head(self) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "created": self.created, "model": self.model, "object": obj}

    # ---- logprobs ------------------------------------------------------------------------------------------
    def names(self):
        return names_for(self.router.base.tokenizer)

    def echo_entries(self) -> list:
        """(id, logprob, top) of each echoed prompt token; the model's first input token has neither (None)."""
        if not self.ids:
            return []
        sc = self.scored.result() if self.scored is not None else None
        rest = list(zip(self.ids[1:], sc.token_logprobs, sc.top)) if sc is not None else []
        return ([(self.ids[0], None, None)] + rest)[self.skip:]

    def echo_logprobs(self) -> dict:
        off, n = Offsets(self.router.base.tokenizer.decode), len(self.prompt_text)
        entries = self.echo_entries()
        return logprobs_obj(self.names(), entries, [min(off.push(e[0]), n) for e in entries])

    def gen_offsets(self) -> Offsets:
        return Offsets(self.router.base.tokenizer.decode, len(self.prompt_text) if self.echo else 0)

    def logprobs(self, out) -> dict | None:
        if self.k is None:
            return None
        obj = self.echo_logprobs() if self.echo else logprobs_obj(self.names(), [], [])
        if out is not None and out.logprobs:
            off, n = self.gen_offsets(), len(self.text(out))
            gen = logprobs_obj(self.names(), out.logprobs, [min(off.push(e[0]), n) for e in out.logprobs])
            obj = {key: obj[key] + gen[key] for key in obj}
        return obj

    # ---- replies -------------------------------------------------------------------------------------------
    def text(self, out) -> str:
        return (self.prompt_text if self.echo else "") + (out.text if out is not None else "")

    def choice(self) -> dict:
        out = self.out()
        finish = out.finish_reason if out is not None else "length"
        if self.chat:
            return {"index": self.index, "message": {"role": "assistant", "content": out.text},
                    "finish_reason": finish, "logprobs": None}
        return {"index": self.index, "text": self.text(out), "finish_reason": finish, "logprobs": self.logprobs(out)}

    def chunk(self, text: str | None, finish=None, first: bool = False, logprobs=None) -> dict:
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if first else
                     {"content": text} if text is not None else {})
            choice = {"index": self.index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {**self.head(), "object": "chat.completion.chunk", "choices": [choice]}
        return {**self.head(), "choices": [{"index": self.index, "text": text or "", "finish_reason": finish,
                                            "logprobs": logprobs}]}


def _usage(calls: list[Call]) -> dict:
    p, n = sum(len(c.ids) for c in calls), sum(c.completion_tokens() for c in calls)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def start_all(calls: list[Call], callbacks=None) -> list:
    """Submit every prompt's jobs; if one is refused (429, context), the others' jobs are cancelled."""
    futs = []
    try:
        for c in calls:
            futs += c.start(*(callbacks(c) if callbacks else ()))
    except BaseException:
        for f in futs:
            f.cancel()
        raise
    return futs


def reply(calls: list[Call]) -> dict:
    c = calls[0]
    return {**c.head(), "user": c.who, "adapter": c.body.adapter, "choices": [x.choice() for x in calls],
            "usage": _usage(calls)}


class _Streamed:
    """One choice's streaming state: its generated tokens' logprobs waiting for their text, the text sent."""

    def __init__(self, call: Call):
        self.call, self.pending, self.sent = call, [], len(call.prompt_text) if call.echo else 0
        self.offsets = call.gen_offsets()

    def add(self, entry) -> None:
        self.pending.append((entry, self.offsets.push(entry[0])))

    def take(self, upto: int) -> dict | None:
        """The pending tokens' logprobs (offsets at most `upto`), or None when logprobs were not asked for."""
        if self.call.k is None:
            return None
        entries, self.pending = self.pending, []
        return logprobs_obj(self.call.names(), [e for e, _ in entries], [min(o, upto) for _, o in entries])


def stream(calls: list[Call]) -> StreamingResponse:
    loop, q = asyncio.get_running_loop(), asyncio.Queue()

    def callbacks(c: Call):
        put = lambda item: loop.call_soon_threadsafe(q.put_nowait, item)  # noqa: E731
        return (lambda piece: put((c.index, "text", piece)),
                (lambda entry: put((c.index, "lp", entry))) if c.k is not None else None)

    futs = start_all(calls, callbacks)
    for c in calls:
        if c.gen is not None:
            c.gen.add_done_callback(lambda f, i=c.index: loop.call_soon_threadsafe(q.put_nowait, (i, "end", None)))
    usage = bool(calls[0].body.stream_options and calls[0].body.stream_options.include_usage)
    return StreamingResponse(_events(calls, futs, q, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _error(e: BaseException) -> str:
    return _sse({"error": {"message": str(e), "type": type(e).__name__}})


async def _events(calls: list[Call], futs: list, q: asyncio.Queue, include_usage: bool):
    first = calls[0]
    try:
        if first.chat:
            yield _sse(first.chunk("", first=True))
        state = {c.index: _Streamed(c) for c in calls}
        for c in calls:  # the echoed prompts first (their scores run before the generations' first step)
            if not c.echo:
                continue
            if c.scored is not None:
                await asyncio.wait([asyncio.wrap_future(c.scored)])
                if c.scored.cancelled():  # the engine saw the connection close
                    return
                if c.scored.exception() is not None:
                    yield _error(c.scored.exception())
                    continue
            yield _sse(c.chunk(c.prompt_text, logprobs=c.echo_logprobs() if c.k is not None else None))
            if c.gen is None:
                yield _sse(c.chunk(None, "length", logprobs=None))
        live = sum(c.gen is not None for c in calls)
        while live:
            i, kind, x = await q.get()
            st = state[i]
            if kind == "lp":
                st.add(x)
            elif kind == "text":
                st.sent += len(x)
                yield _sse(st.call.chunk(x, logprobs=st.take(st.sent)))
            else:
                live -= 1
                fut = st.call.gen
                if fut.cancelled():  # the engine saw the connection close: nobody reads the rest
                    return
                if fut.exception() is not None:  # this request failed mid-stream: say so in the stream
                    yield _error(fut.exception())
                    continue
                rest = st.take(st.sent)
                yield _sse(st.call.chunk(None, fut.result().finish_reason,
                                         logprobs=rest if rest and rest["tokens"] else None))
        if include_usage:
            yield _sse({**first.head(), "object": "chat.completion.chunk" if first.chat else "text_completion",
                        "choices": [], "usage": _usage([c for c in calls if c.gen is None or not c.gen.exception()])})
        yield "data: [DONE]\n\n"
    finally:
        if not all(f.done() for f in futs):  # the client went away: free the rows at the next decode step
            for f in futs:
                f.cancel()
            first.router.engine.wake()


def add_openai_routes(app: FastAPI, router, caller, http_error, body_of) -> None:
    """`body_of(request, model)`: the app's body reader (limits, timeout, strict JSON, 4xx on bad input)."""
    from .bodies import schema_of

    async def run(request: Request, model, chat: bool):
        caller(request, None)  # the token before the body
        body = await body_of(request, model)
        who = caller(request, body.user)
        try:
            prompts = [(chat_ids(router, body.messages), "", 0)] if chat else completion_prompts(router, body.prompt)
            gains = await run_in_threadpool(router.row_for, who, body.adapter)
            calls = [Call(router, who, body, ids, chat, gains, conn_of(request), i, text, skip)
                     for i, (ids, text, skip) in enumerate(prompts)]
            for c in calls[1:]:  # one response
                c.id, c.created = calls[0].id, calls[0].created
            if body.stream:
                return stream(calls)
            done = await wait_all(start_all(calls), request, router)
            if not done:
                return Response(status_code=499)  # client closed the request; nobody reads this
            return reply(calls)
        except SharedLLMError as e:
            raise http_error(e) from None

    @app.post("/v1/completions", openapi_extra=schema_of(Completion))
    async def completions(request: Request):
        return await run(request, Completion, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schema_of(Chat))
    async def chat_completions(request: Request):
        return await run(request, Chat, chat=True)
