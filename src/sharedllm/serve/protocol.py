"""The HTTP/1.1 protocol under the server: uvicorn's h11 protocol, except that its own refusals (a request h11
cannot parse: a bad or duplicate Content-Length, a NUL or other illegal byte in a header, a malformed request line,
a head over h11's size limit) answer with a JSON body like every other error of this server, not plain text.
uvicorn takes it as `http=PROTOCOL`, an import string, so that `--workers` processes import it too."""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

PROTOCOL = "sharedllm.serve.protocol:JsonH11Protocol"


class JsonH11Protocol(H11Protocol):
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
