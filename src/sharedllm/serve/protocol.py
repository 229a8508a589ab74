"""The HTTP/1.1 protocol under the server: uvicorn's h11 protocol, except that its own refusals (a request h11
cannot parse: a bad or duplicate Content-Length, a NUL or other illegal byte in a header, a malformed request line,
a head over h11's size limit) answer with a JSON body like every other error of this server, not plain text.
uvicorn takes it as `http=PROTOCOL`, an import string, so that `--workers` processes import it too.

Connection hygiene (`Limits`, read from the app's `state.connection_limits`, set by `serve.build`): a connection with
no request in progress is closed after `keep_alive_s` (from its accept, or from the end of its last response:
uvicorn's own keep-alive timer only starts after a first response); a request head must be complete within
`header_timeout_s` of its first byte (else a JSON 408 and close), and a request body within `body_timeout_s` of its
head, whoever reads it (else a JSON 408 if no response has started, and close; the app sees a disconnect). A
connection over `max_connections` in this process, or over `max_connections_per_client` from one peer address (0:
no cap), gets a JSON 503 with Retry-After and is closed (after at most `REFUSE_LINGER_S`, so that a client still
sending its request reads the 503 instead of a reset); beyond `max_connections` + `refuse_slack`, or beyond
`REFUSE_LINGER_PER_CLIENT` refusals lingering from its address, it is closed at once. `fit_fd_limit` keeps the
caps under the process's open-file limit, so the accept loop never runs out of descriptors ("Too many open
files")."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

PROTOCOL = "sharedllm.serve.protocol:JsonH11Protocol"
REFUSE_LINGER_S = 1.0  # a refused connection stays open this long at most, reading nothing, so its 503 is read
REFUSE_LINGER_PER_CLIENT = 8  # refused connections lingering per peer address; more are closed at once


@dataclass(frozen=True)
class Limits:
    """Per server process (each of `--workers N` has its own)."""
    keep_alive_s: float = 5.0  # no request in progress: closed after this (from accept, or the last response)
    header_timeout_s: float = 10.0  # a request head, from its first byte
    body_timeout_s: float = 60.0  # a whole request body, from the end of its head
    max_connections: int = 1024  # open connections; beyond: JSON 503 and close
    max_connections_per_client: int = 64  # open connections from one peer address; 0: no cap

    @property
    def refuse_slack(self) -> int:
        """Refused connections that may linger (to read their 503) beyond `max_connections`; more are cut at once."""
        return max(16, self.max_connections // 16)

    def fds_needed(self) -> int:
        """Descriptors these caps may hold at once: the connections, the refused ones lingering, the accept loop's
        batches (asyncio accepts up to a backlog per loop pass, and a connection is refused two passes later, so
        up to about three batches are in flight) and the process's own (OWN_FDS)."""
        return self.max_connections + self.refuse_slack + 3 * accept_backlog(self) + OWN_FDS


OWN_FDS = 64  # the server's own descriptors besides connections (measured: 10 with the tiny base, idle)


def accept_backlog(limits: Limits) -> int:
    """uvicorn's `backlog`: the listen queue, and the most connections asyncio accepts per loop wake-up. As long as
    the cap: a burst of connects waits in the kernel's queue (no descriptor) instead of having its SYNs dropped,
    which would cost every client caught in it a 1 s (then 3 s, 7 s) retransmission."""
    return min(2048, max(16, limits.max_connections))


def fit_fd_limit(limits: Limits) -> tuple[Limits, str | None]:
    """Raise the soft RLIMIT_NOFILE towards what `limits` need (up to the hard limit); if it is still short,
    lower `max_connections` to fit. (limits, a note for the log or None)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return limits, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.fds_needed()
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return limits, None
    fit = limits
    while fit.max_connections > 1 and fit.fds_needed() > soft:
        fit = replace(fit, max_connections=max(1, fit.max_connections * 3 // 4))
    fit = replace(fit, max_connections_per_client=min(fit.max_connections_per_client, fit.max_connections))
    return fit, (f"open-file limit {soft}: --max-connections lowered from {limits.max_connections} to "
                 f"{fit.max_connections} (raise the limit with ulimit -n to serve more)")


def limits_of(app) -> Limits:
    """The `Limits` on the served app (`app.state.connection_limits`), under whatever middleware uvicorn wrapped it
    in; the defaults if there are none."""
    for _ in range(16):
        found = getattr(getattr(app, "state", None), "connection_limits", None)
        if isinstance(found, Limits):
            return found
        app = getattr(app, "app", None)
        if app is None:
            break
    return Limits()


def _json_response(status: int, reason: bytes, detail: str, *extra: tuple[bytes, bytes]) -> bytes:
    """A complete HTTP/1.1 response with a JSON body and Connection: close, as raw bytes: it is written where
    no request has been parsed (h11 has no response to send then) or instead of the app's own."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *extra]
    return (b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(k + b": " + v + b"\r\n" for k, v in head) +
            b"\r\n" + body)


class JsonH11Protocol(H11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not hasattr(config, "_sharedllm_limits"):
            config._sharedllm_limits = limits_of(config.loaded_app)
        self.limits: Limits = config._sharedllm_limits
        self.timeout_keep_alive = self.limits.keep_alive_s  # uvicorn's own timer, after each response
        if not hasattr(server_state, "_sharedllm_peers"):
            server_state._sharedllm_peers = Counter()  # open, accepted connections per peer address
            server_state._sharedllm_lingering = Counter()  # refused connections still open, per peer address
        self.peers: Counter = server_state._sharedllm_peers
        self.lingering: Counter = server_state._sharedllm_lingering
        self.peer: str | None = None  # counted in `peers` while open
        self.lingers: str | None = None  # counted in `lingering` while open
        self.refused = False
        self._head_timer = self._body_timer = self._linger = None

    # ---- accept: caps ------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        open_now = len(self.connections)  # before this one
        super().connection_made(transport)
        peer = get_remote_addr(transport)
        host = peer[0] if peer else ""
        lim = self.limits
        if open_now >= lim.max_connections:
            self._refuse(open_now, host, f"this server has {open_now} connections open, its limit; retry later")
        elif lim.max_connections_per_client and self.peers[host] >= lim.max_connections_per_client:
            self._refuse(open_now, host, f"{self.peers[host]} connections are open from your address, this "
                                         f"server's limit per client; reuse a connection or retry later")
        else:
            self.peer = host
            self.peers[host] += 1
            # idle from the accept: uvicorn arms its keep-alive timer only after a first response
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def _refuse(self, open_now: int, host: str, detail: str) -> None:
        self.refused = True
        if (open_now >= self.limits.max_connections + self.limits.refuse_slack
                or self.lingering[host] >= REFUSE_LINGER_PER_CLIENT):
            self.transport.abort()  # a flood: no descriptor spent on politeness
            return
        try:
            self.transport.write(_json_response(503, b"Service Unavailable", detail, (b"retry-after", b"1")))
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except OSError:  # the client has already reset the connection (ENOTCONN): nothing to say
            self.transport.abort()
            return
        self.lingers = host
        self.lingering[host] += 1
        self._linger = self.loop.call_later(REFUSE_LINGER_S, self.transport.close)

    def connection_lost(self, exc) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._linger = None
        for counter, attr in ((self.peers, "peer"), (self.lingering, "lingers")):
            host = getattr(self, attr)
            if host is not None:
                counter[host] -= 1
                if counter[host] <= 0:
                    del counter[host]
                setattr(self, attr, None)
        super().connection_lost(exc)

    # ---- requests: head and body deadlines ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # its 503 is written; what it sends is not read
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # a pipelined request may have been parsed, or part of its head be waiting

    def _watch(self) -> None:
        """Arm or disarm the head and body deadlines from where h11 stands: waiting for a head with part of it
        in (head), or inside a request body (body)."""
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE and self.conn.trailing_data[0]:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.transport.write(_json_response(408, b"Request Timeout", f"request head not complete within "
                                                                      f"{self.limits.header_timeout_s:g} s"))
        self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.transport.write(_json_response(408, b"Request Timeout", f"request body not complete within "
                                                                          f"{self.limits.body_timeout_s:g} s"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect; its reply is dropped
            cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's own 400 for a request it could not parse, with a {"detail": ...} body as every error here. A
        request already handed to the app (its chunked body turned out malformed) ends as a disconnect for the app,
        so that the app's own reply is dropped instead of raising (and logging) a protocol error."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            self._send_json_400(f"{msg} (malformed request line, header, Content-Length or chunked body)")
        self.transport.close()

    def _send_json_400(self, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=head, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
