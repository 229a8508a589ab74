"""The browser playground at `/`: three static files in `serve/static/` (no build step, no CDN, nothing fetched
from elsewhere), read once from the installed package. The page talks only to the public API with the token
pasted into it (same auth, same limits as any client): chat with one's adapter beside the bare base, both streamed;
per-token surprise of a text under each; for the admin token, the users, their adapters and the cache
(`GET /v1/users`, `/health`). The page builds every node with `textContent` (never `innerHTML`), and the
Content-Security-Policy allows only this origin's script, style and API."""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
         "playground.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}


def static_bytes(name: str) -> bytes:
    return resources.files("sharedllm.serve").joinpath("static", name).read_bytes()


def add_playground_routes(app: FastAPI) -> None:
    files = {name: (static_bytes(name), media) for name, media in FILES.items()}

    def route(name: str):
        data, media = files[name]

        def serve() -> Response:  # no parameters: nothing from the request selects a file
            return Response(data, media_type=media, headers=HEADERS)
        return serve

    for name in FILES:
        path = "/" if name == "index.html" else f"/static/{name}"
        app.add_api_route(path, route(name), methods=["GET"], include_in_schema=False)
