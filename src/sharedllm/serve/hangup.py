"""Noticing a closed client connection from the engine thread, without waiting for the event loop.

The HTTP side learns of a disconnect when the event loop reads the socket's end (`http.disconnect`), then cancels
the request's future. Under load that lags: the event loop needs the GIL (held by the engine thread for most of
each decode step) for each of the several loop turns between the socket's end and `future.cancel()`, and a
flood of disconnects is handled a few per turn, so rows used to run 3-5 decode steps after their clients left.
So each request also carries its connection's socket (`conn_socket`, taken from uvicorn's ASGI `receive`), and
the engine polls the active rows' sockets once per step, before computing (`hung_up`: one `poll()` call, no
read, nothing taken from the event loop's stream): a row whose client closed its connection is cancelled and
dropped at the first step boundary after the close. A socket that is already closed (`fileno() == -1`) counts
as gone: uvicorn closes a connection's socket only when the client has left or the response is complete, and a
row's response cannot be complete while the row runs. Where the socket cannot be found (another ASGI server,
in-process test clients) or `poll` has no `POLLRDHUP` (not Linux), `conn_socket` gives None and only the HTTP
side's cancellation applies.
"""
from __future__ import annotations

import select

POLLRDHUP = getattr(select, "POLLRDHUP", None)  # Linux: the peer closed (or shut down) its side
_GONE = (POLLRDHUP or 0) | select.POLLHUP | select.POLLERR | getattr(select, "POLLNVAL", 0)


def conn_socket(receive):
    """The socket under an ASGI request, from uvicorn's `receive` (a method of its request cycle), or None."""
    if POLLRDHUP is None or not hasattr(select, "poll"):
        return None
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    try:
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock if sock is not None and sock.fileno() >= 0 else None
    except Exception:  # an unexpected transport: fall back to the HTTP side's disconnect
        return None


def hung_up(socks) -> list[bool]:
    """For each socket (or None: unknown), whether its peer has closed the connection. One `poll()`, no wait."""
    out = [False] * len(socks)
    fds: dict[int, list[int]] = {}
    for i, s in enumerate(socks):
        if s is None:
            continue
        try:
            fd = s.fileno()
        except Exception:
            fd = -1
        if fd < 0:
            out[i] = True  # closed already: the client left (see the module's note)
        else:
            fds.setdefault(fd, []).append(i)
    if not fds:
        return out
    try:
        p = select.poll()
        for fd in fds:
            p.register(fd, POLLRDHUP)
        events = p.poll(0)
    except (OSError, ValueError):  # never fail a step over a probe: the HTTP side still cancels
        return out
    for fd, ev in events:
        if ev & _GONE:
            for i in fds.get(fd, ()):
                out[i] = True
    return out
