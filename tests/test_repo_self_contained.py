"""The repository carries the data it uses: nothing in it may reach a path outside the checkout."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("src", "tests", "bench", "experiments", "docs", "README.md", "pyproject.toml", ".ci")
OUTSIDE = re.compile(r"\.\./shared|parents\[\d\]\.parent\b|REPO\.parent\b|/work/shared")


def _files():
    for name in SCANNED:
        p = REPO / name
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        yield from (f for f in files if f.suffix in {".py", ".md", ".toml", ""} and "__pycache__" not in f.parts)


def test_no_path_outside_the_repository():
    hits = [f"{f.relative_to(REPO)}:{i}: {line.strip()}" for f in _files() if f.name != Path(__file__).name
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "paths outside the checkout:\n" + "\n".join(hits)


def test_corpora_are_in_the_repository():
    corpora = REPO / "data" / "corpora"
    texts = sorted(corpora.glob("*/*.txt"))
    assert len(texts) >= 24, texts
    assert (corpora / "MANIFEST.md").is_file() and (corpora / "LICENSES").is_dir()
    from sharedllm.bets.catalogue import current

    assert current().default("CORPORA").resolve() == corpora.resolve()
