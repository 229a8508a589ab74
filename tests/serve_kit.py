"""Shared helpers for the server tests: adapters for the tiny base, single-user references, a live server."""
from __future__ import annotations

import socket
import threading
import time

import torch

from sharedllm import wire
from sharedllm.personalise import load_adapted, new_adapter, save_adapted
from sharedllm.serve.protocol import PROTOCOL

ADMIN = "test-admin-token-0123456789abcdefghij"


def moved(adapted, scale: float = 0.3, seed: int = 0):
    """`adapted` with every trainable value moved by seeded noise of size `scale` (in place; returned)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.params.values():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return adapted


def mixed_and_alone(rm, ids, users: list, method: str) -> list:
    """[(row i's logits in one mixed batch of `users` (Adapted of `method`, each with its own config), user i's own
    model's logits alone on ids[i])] for every user: the caller asserts they agree."""
    states = [rm.row({n: p.detach() for n, p in u.params.items()}, method, u.config) for u in users]
    mixed = rm.forward(ids, states).logits
    with torch.no_grad():
        return [(mixed[i], u.model(input_ids=ids[i:i + 1]).logits[0]) for i, u in enumerate(users)]


def adapter_bytes(base, seed: int, tmp_path, scale: float = 0.3, method: str = "norm") -> bytes:
    """An adapter of `method` for `base` whose values differ from a fresh one's (seeded), as the CLI would save it."""
    adapted = moved(new_adapter(base, method), scale, seed)
    path = tmp_path / f"{method}-{seed}.safetensors"
    save_adapted(adapted, path, base)
    return path.read_bytes()


def raw_adapter(flat: torch.Tensor, meta: dict) -> bytes:
    return wire.adapter_bytes({"adapter": flat}, meta)


def text_ids(base, text: str) -> list[int]:
    return [base.tokenizer.bos_id] + base.tokenizer.encode(text)


@torch.no_grad()
def reference_score(model, ids: list[int]) -> float:
    """Summed log-probability of ids[1:] given the prefix, one sequence alone."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


def alone(base, data: bytes):
    return load_adapted(base, data=data, source="reference").model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=PROTOCOL))  # as `sharedllm serve` runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
