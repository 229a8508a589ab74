"""Short runs of the two fuzzers (the full 1,000-input runs are in docs/BENCHMARKS.md), and the bound on how much
a score may depend on which other requests share its batch."""
import random
import re
import subprocess
import sys
from pathlib import Path

from sharedllm.personalise import load_adapted
from sharedllm.serve.compute import score_batch
from sharedllm.adapters.rows import RowModel

from .serve_kit import adapter_bytes

BENCH = Path(__file__).resolve().parents[1] / "bench"
BATCH_BOUND_PER_TOKEN = 1e-6  # nats; README "Scores in mixed batches"


def _fuzz(script: str, n: int) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--n", str(n), "--seed", "1"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


ISSUE_34_KINDS = ("offsets/shape", "metadata shapes", "surrogate", "unknown field", "version")


def test_adapter_fuzzer_short_run_finds_nothing():
    table = _fuzz("fuzz_adapters.py", 100)
    assert "| 100 |" in table and "accepted-invalid" in table
    line = next(x for x in table.splitlines() if x.startswith("by kind: "))
    kinds = {m[1]: (int(m[2]), int(m[4])) for m in (re.fullmatch(r"(.+) (\d+) \((\d+) valid, (\d+) bad\)", part)
                                                    for part in line[len("by kind: "):].split("; "))}
    assert sum(n for n, _ in kinds.values()) == 100 and all(bad == 0 for _, bad in kinds.values())
    assert all(kinds[k][0] > 0 for k in ISSUE_34_KINDS), kinds  # issue 34's kinds all ran


def test_api_fuzzer_short_run_finds_nothing():
    table = _fuzz("fuzz_api.py", 100)
    assert "| 100 |" in table and "cross-user access" in table


def test_a_score_depends_on_its_batch_by_at_most_the_stated_bound(tiny, tmp_path):
    rgm = RowModel(tiny)
    adapted = [load_adapted(tiny, data=adapter_bytes(tiny, i, tmp_path, scale=0.2 if i % 2 else 0.3,
                                                     method="lora" if i % 2 else "norm"), source="a")
               for i in range(4)]  # norm, LoRA, norm, LoRA
    gains = [rgm.row({n: p.detach() for n, p in a.params.items()}, a.method, a.config) for a in adapted]
    rng = random.Random(0)
    rows = [[256] + [rng.randrange(256) for _ in range(n)] for n in (3, 40, 300, 900, 17, 600)]
    alone = [score_batch(rgm, [r], [gains[i % 4]])[0].logprob for i, r in enumerate(rows)]
    for _ in range(4):
        idx = rng.sample(range(len(rows)), rng.randint(2, len(rows)))
        for i, got in zip(idx, score_batch(rgm, [rows[i] for i in idx], [gains[i % 4] for i in idx])):
            assert abs(got.logprob - alone[i]) <= BATCH_BOUND_PER_TOKEN * (len(rows[i]) - 1)
