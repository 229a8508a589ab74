"""Connection hygiene over a real loopback socket (issue 34 item 3): idle, header-trickling and body-trickling
connections are closed within the configured timeouts (small ones here; the waits are generous upper bounds, never
speed thresholds), connections over the per-client and the total cap get a JSON 503, and a `sharedllm serve` with a
small open-file limit stays healthy under a flood of idle sockets, with no "Too many open files" in its log."""
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time

import httpx
import pytest

from sharedllm.serve import build, protocol, wait_until_healthy
from sharedllm.serve.protocol import Limits, fit_fd_limit
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, LiveServer, adapter_bytes, free_port

WAIT_S = 30  # the most any test waits for the server to act: generous; the timeouts themselves are 0.5-1.5 s
SMALL = Limits(keep_alive_s=0.5, header_timeout_s=1.0, body_timeout_s=1.5, max_connections=64,
               max_connections_per_client=8)


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def serve(tiny, tmp_path, monkeypatch, limits):
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    # a per-chunk read timeout far above the trickles' pace: only the overall body deadline can end them
    app, router, _ = build(tiny, tmp_path / "store", read_timeout_s=60, window_s=0.01, limits=limits)
    live = LiveServer(app).__enter__()
    live.router = router
    with httpx.Client(base_url=live.url, timeout=60) as c:
        live.token = c.post("/v1/users", json={"user": "ann"}, headers=auth(ADMIN)).json()["token"]
    return live


@pytest.fixture
def live(tiny, tmp_path, monkeypatch):
    srv = serve(tiny, tmp_path, monkeypatch, SMALL)
    yield srv
    srv.__exit__(None, None, None)
    srv.router.close()
    srv.router.store.close()


def connect(live, source: str = "127.0.0.1") -> socket.socket:
    """A connection from `source` (any 127.x.y.z is a loopback address of its own: another client)."""
    s = socket.create_connection(("127.0.0.1", live.port), source_address=(source, 0))
    s.settimeout(WAIT_S)
    return s


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed); fails after WAIT_S."""
    out, deadline = b"", time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out
    except socket.timeout:
        pass
    raise AssertionError(f"the server kept the connection open for {WAIT_S} s; got {out[:200]!r}")


def trickle(s: socket.socket, what: bytes, every_s: float = 0.1) -> bytes:
    """Send `what` one byte at a time, every `every_s`, reading whatever the server sends meanwhile, until it closes
    the connection: all it sent. Fails if `what` runs out or WAIT_S passes first."""
    out, deadline = b"", time.monotonic() + WAIT_S
    for i in range(len(what)):
        if time.monotonic() > deadline:
            break
        try:
            s.send(what[i:i + 1])
        except OSError:  # closed under us: read what it said
            return out + until_closed(s)
        if select.select([s], [], [], every_s)[0]:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
    raise AssertionError(f"still open after {WAIT_S} s of trickling; got {out[:200]!r}")


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    return int(head.split()[1]), json.loads(body)


def request(path: bytes, token: str | None = None, length: int | None = None, method: bytes = b"POST") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: x"]
    if token:
        lines.append(b"Authorization: Bearer " + token.encode())
    if length is not None:
        lines += [b"Content-Type: application/json", b"Content-Length: " + str(length).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ---- timeouts -------------------------------------------------------------------------------------------------

def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(live):
    s = connect(live)  # never sends a byte: uvicorn alone would hold it forever
    assert until_closed(s) == b""


def test_a_connection_idle_after_a_response_is_closed(live):
    s = connect(live)
    s.sendall(request(b"/health", method=b"GET"))
    raw = until_closed(s)  # the response, then the close once it has idled past keep_alive_s
    assert status_and_json(raw)[0] == 200


def test_a_trickled_request_head_gets_408_and_is_closed(live):
    s = connect(live)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 2000 + b"\r\n\r\n"
    status, body = status_and_json(trickle(s, head))  # a byte every 0.1 s: 200 s for all
    assert status == 408 and "head" in body["detail"]


@pytest.mark.parametrize("method", ["norm", "lora"])
def test_a_trickled_adapter_upload_gets_408_within_the_body_deadline(live, tmp_path, tiny, method):
    """Each byte comes well within the 60 s per-chunk timeout; the 1.5 s overall deadline ends it. Then the same
    adapter sent at once is stored: the deadline does not touch a normal upload (a LoRA file is the largest)."""
    data = adapter_bytes(tiny, 3, tmp_path, method=method)
    s = connect(live)
    s.sendall(request(b"/v1/users/ann/adapter", live.token, len(data), b"PUT") + data[:100])
    status, body = status_and_json(trickle(s, data[100:]))
    assert status == 408 and "body" in body["detail"]
    assert httpx.get(f"{live.url}/v1/users/ann/adapter", headers=auth(live.token)).status_code == 404
    r = httpx.put(f"{live.url}/v1/users/ann/adapter", content=data, headers=auth(live.token), timeout=60)
    assert r.status_code == 200 and r.json()["method"] == method


def test_a_trickled_json_body_gets_408(live):
    body = json.dumps({"text": "the cat sat on the mat " * 20, "adapter": "none"}).encode()
    s = connect(live)
    s.sendall(request(b"/v1/score", live.token, len(body)))
    status, detail = status_and_json(trickle(s, body))
    assert status == 408 and "body" in detail["detail"]
    ok = httpx.post(f"{live.url}/v1/score", content=body, headers={**auth(live.token),
                                                                   "Content-Type": "application/json"})
    assert ok.status_code == 200  # the server goes on; the 499 the app saw is not a failure
    assert live.router.stats()["failed_rows"] == 0


def test_a_body_trickled_after_an_early_401_is_cut_off(live):
    """Auth comes before the body: the 401 is sent at once; a client that keeps trickling the body it declared
    is then closed by the body deadline (uvicorn alone would read it forever, a byte at a time)."""
    s = connect(live)
    s.sendall(request(b"/v1/score", None, 100_000))
    raw = trickle(s, b"x" * 100_000, every_s=0.05)
    assert status_and_json(raw)[0] == 401


def test_a_response_outliving_every_timeout_completes(live, tiny, tmp_path):
    """The deadlines cover a request's head and body, never its response: a LoRA user's stream whose client reads
    the first event, pauses past every timeout (0.5-1.5 s here), then reads on, gets all of it."""
    with httpx.Client(base_url=live.url, timeout=120) as c:
        assert c.put("/v1/users/ann/adapter", content=adapter_bytes(tiny, 1, tmp_path, method="lora"),
                     headers=auth(live.token)).status_code == 200
        with c.stream("POST", "/v1/completions", json={"prompt": "the", "max_tokens": 40, "temperature": 0,
                                                        "stream": True}, headers=auth(live.token)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            time.sleep(2 * SMALL.body_timeout_s)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "choices" in json.loads(first[6:]), first
        assert rest[-1] == "data: [DONE]"


# ---- caps -----------------------------------------------------------------------------------------------------

def settle(live, n: int) -> None:
    """Wait until the server holds exactly n connections (a client's close reaches it asynchronously)."""
    deadline = time.monotonic() + WAIT_S
    while len(live.server.server_state.connections) != n:
        assert time.monotonic() < deadline, len(live.server.server_state.connections)
        time.sleep(0.01)


def held(live, n) -> list[socket.socket]:
    """n connections the server has accepted and answered once (so they are counted), kept open."""
    settle(live, 0)
    socks = []
    for _ in range(n):
        s = connect(live)
        s.sendall(request(b"/health", method=b"GET"))
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        socks.append(s)
    return socks


def refused(live) -> dict:
    r = httpx.get(f"{live.url}/health", timeout=WAIT_S)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    return r.json()


@pytest.fixture
def capped(tiny, tmp_path, monkeypatch, request):
    total, per_client = request.param
    srv = serve(tiny, tmp_path, monkeypatch, Limits(keep_alive_s=60, max_connections=total,
                                                    max_connections_per_client=per_client))
    yield srv
    srv.__exit__(None, None, None)
    srv.router.close()
    srv.router.store.close()


def until_accepted(live):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        r = httpx.get(f"{live.url}/health", timeout=WAIT_S)
        if r.status_code == 200:
            return r
        time.sleep(0.05)
    raise AssertionError("a connection was never accepted again")


@pytest.mark.parametrize("capped", [(64, 3)], indirect=True)
def test_the_connection_over_the_per_client_cap_gets_a_json_503(capped, monkeypatch):
    socks = held(capped, 3)
    assert "from your address" in refused(capped)["detail"]
    other = connect(capped, "127.0.0.2")  # another address is not capped by this one's connections
    other.sendall(request(b"/health", method=b"GET"))
    assert other.recv(65536).startswith(b"HTTP/1.1 200")
    # refusals linger (so that the 503 is read) at most REFUSE_LINGER_PER_CLIENT per address; beyond: cut at once
    monkeypatch.setattr(protocol, "REFUSE_LINGER_S", WAIT_S)
    settle(capped, 4)
    lingering = [connect(capped) for _ in range(protocol.REFUSE_LINGER_PER_CLIENT)]
    for s in lingering:
        assert status_and_json(until_answered(s))[0] == 503
    assert until_closed(connect(capped)) == b""
    [s.close() for s in lingering + [other]]
    socks.pop().close()
    until_accepted(capped)  # one slot free again
    [s.close() for s in socks]


@pytest.mark.parametrize("capped", [(4, 0)], indirect=True)
def test_the_connection_over_the_total_cap_gets_a_json_503_and_a_flood_beyond_is_cut(capped, monkeypatch):
    socks = held(capped, 4)
    assert "connections open" in refused(capped)["detail"]
    # refused connections linger (to let their 503 be read) up to max_connections + refuse_slack; beyond, they are
    # closed at once, without a word
    monkeypatch.setattr(protocol, "REFUSE_LINGER_S", WAIT_S)
    settle(capped, 4)  # the refused client above has closed
    slack = Limits(max_connections=4).refuse_slack
    lingering = [connect(capped, f"127.0.1.{i + 1}") for i in range(slack)]  # each its own address
    for s in lingering:
        assert status_and_json(until_answered(s))[0] == 503
    assert until_closed(connect(capped, "127.0.2.1")) == b""  # over max + slack: cut
    [s.close() for s in lingering]
    socks.pop().close()
    until_accepted(capped)
    [s.close() for s in socks]


def until_answered(s: socket.socket) -> bytes:
    """What the server sent once a whole response is in (a refused connection lingers open after its 503)."""
    out, deadline = b"", time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        out += s.recv(65536)
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep and len(body) >= int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
            return out
    raise AssertionError(out[:200])


def test_fit_fd_limit_lowers_the_cap_to_a_small_open_file_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (300, 300))
    monkeypatch.setattr(resource, "setrlimit", lambda *a: (_ for _ in ()).throw(ValueError("no")))
    fit, note = fit_fd_limit(Limits())
    assert fit.fds_needed() <= 300 and 1 <= fit.max_connections < Limits().max_connections and "lowered" in note
    assert fit.max_connections_per_client <= fit.max_connections
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert fit_fd_limit(Limits()) == (Limits(), None)


# ---- the real command, with a small open-file limit -------------------------------------------------------------

def test_serve_with_a_small_open_file_limit_survives_a_flood_of_idle_sockets(tmp_path):
    """The issue's case: with the open-file limit at 35, 28 idle sockets locked every client out and the accept
    loop logged "Too many open files" over and over. Here the limit is 400 and 600 idle sockets connect: the
    server lowers its cap to fit, refuses what is over it with a JSON 503, reaps the idle ones, and answers again;
    its log has no accept error."""
    port, limit = free_port(), 400
    env = {k: v for k, v in os.environ.items() if k != ADMIN_ENV}
    cmd = [sys.executable, "-m", "sharedllm.cli", "serve", "--base", "tiny", "--store", str(tmp_path / "store"),
           "--port", str(port), "--keep-alive-s", "1", "--max-connections-per-client", "0"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_healthy(url, proc, 180), (tmp_path / "server.log").read_text()
        idle = []
        for _ in range(600):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT_S))
            except OSError:  # the listen queue full for a moment: the server is refusing, as it should
                time.sleep(0.01)
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < limit
        deadline, answers = time.monotonic() + 120, set()
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{url}/health", timeout=WAIT_S)
            except httpx.TransportError:
                answers.add("transport error")
                continue
            answers.add(r.status_code)
            assert r.headers["content-type"] == "application/json"
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200, answers
        [s.close() for s in idle]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    logged = (tmp_path / "server.log").read_text()
    assert "lowered" in logged
    for bad in ("Too many open files", "out of system resource", "Traceback"):
        assert bad not in logged, logged[-3000:]


def test_the_serve_command_takes_the_connection_options_and_refuses_bad_values(capsys):
    from sharedllm.cli import build_parser
    from sharedllm.commands.serve import limits

    parser, _ = build_parser()
    assert limits(parser.parse_args(["serve"])) == Limits()  # the documented defaults
    args = parser.parse_args(["serve", "--keep-alive-s", "2", "--header-timeout-s", "3", "--body-timeout-s", "4.5",
                              "--max-connections", "100", "--max-connections-per-client", "0",
                              "--max-rows-per-user", "4"])
    assert limits(args) == Limits(2, 3, 4.5, 100, 0) and args.max_rows_per_user == 4
    for bad in (["--keep-alive-s", "0"], ["--body-timeout-s", "-1"], ["--header-timeout-s", "inf"],
                ["--max-connections", "0"], ["--max-connections-per-client", "-1"], ["--max-rows-per-user", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])
        assert bad[0] in capsys.readouterr().err


def test_a_refused_client_that_already_reset_is_cut_quietly():
    """Seen in the idle-socket bench: a refused connection whose client had reset it before the refusal was
    written (shutdown -> ENOTCONN) logged a traceback from connection_made. Now it is aborted, and not counted."""
    from collections import Counter

    class Gone:
        aborted = False

        def write(self, data):
            pass

        def can_write_eof(self):
            return True

        def write_eof(self):
            raise OSError(107, "Transport endpoint is not connected")

        def abort(self):
            self.aborted = True

    proto = protocol.JsonH11Protocol.__new__(protocol.JsonH11Protocol)
    proto.limits, proto.lingering, proto.transport, proto.lingers = Limits(), Counter(), Gone(), None
    proto._refuse(0, "127.0.0.1", "over the cap")
    assert proto.transport.aborted and proto.refused and not proto.lingering and proto.lingers is None
