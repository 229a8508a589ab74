"""sharedllm bases: every named base (`--base NAME` anywhere a base is accepted), its size and whether it is cached."""
from __future__ import annotations

from .. import registry

HELP = "list the named bases: parameters, norm gains, download size, cached or not, fingerprint"


def configure(p) -> None:
    p.set_defaults()


def run(args) -> dict:
    return {"cache": str(registry.cache_dir()), "bases": registry.listing()}


def render(r: dict) -> str:
    lines = [f"{'name':22s} {'params':>8s} {'gains':>7s} {'download':>9s}  cached  fingerprint",
             *(_row(b) for b in r["bases"]), f"cache: {r['cache']}  (use a name with --base; "
                                              "the first use downloads and converts it once)"]
    return "\n".join(lines)


def _row(b: dict) -> str:
    name = b["name"] + (f" ({', '.join(b['aliases'])})" if b["aliases"] else "")
    fp = (b["fingerprint"] or "?")[:16] if b["cached"] else "-"
    return (f"{name:22s} {b['params'] / 1e6:7.0f}M {b['gains']:7,d} {b['download_bytes'] / 1e6:6.0f} MB  "
            f"{'yes' if b['cached'] else 'no':6s}  {fp}\n{'':22s} {b['description']}")
