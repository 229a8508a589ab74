"""Fleet economics (issue 32 item 5): per base and per-user format, bytes per user, the 215,000-user fleet's
storage, CPU-minutes to train one user, held-out ppl relative to the raw adapter and decode throughput served in a
mixed batch relative to norm adapters', from committed measurements.

    python bench/fleet_economics.py [--users 215000] [--json]

Every cell says where it comes from: `measured` (a committed result file under bench/results/, named in the row),
`arithmetic` (bytes from the measured trainable-parameter count at 2 bytes a value plus the header measured on the
default base's files of that method), or `not measured`. Nothing here is estimated beyond that arithmetic; the
CPU-minutes are 100 training steps (batch 2 x 256, sharedllm's trainer) x the CPU seconds per step measured in the
docs/BENCHMARKS.md section named in SOURCES (on loaded 2-core machines: CPU seconds, not wall, and still inflated by
cache contention, so read them as upper bounds).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 100
# trainable numbers per user (docs/BENCHMARKS.md, "Named bases: ... one training step each", measured at load)
TRAINABLE = {"smollm2-135m-instruct": {"norm": 35_136, "lora-r4": 1_221_120},
             "qwen2.5-coder-0.5b": {"norm": 43_904, "lora-r4": 2_199_552},
             "qwen2.5-coder-1.5b": {"norm": 87_552, "lora-r4": 4_616_192}}
LAYERS = {"smollm2-135m-instruct": 30, "qwen2.5-coder-0.5b": 24, "qwen2.5-coder-1.5b": 28}
# header bytes of an fp16 adapter file of the default base (file size - 2 x params; measured on the committed files)
HEADER = {"norm": 71_320 - 2 * 35_136, "lora-r4": 2_446_496 - 2 * 1_221_120}
# CPU seconds per training step (batch 2 x 256) and where each was measured
CPU_S_PER_STEP = {
    ("qwen2.5-coder-0.5b", "norm"): (6.90, "BENCHMARKS 'The 0.5B base in bf16': one at a time, bf16, 1 thread"),
    ("qwen2.5-coder-1.5b", "norm"): (17.3, "BENCHMARKS '1.5B in bf16': bench/base_steps.py, bf16, 1 thread"),
    ("qwen2.5-coder-1.5b", "lora-r4"): (19.6, "BENCHMARKS '1.5B in bf16': bench/base_steps.py, bf16, 1 thread"),
}
TRAIN_STEP_RESULT = "train_step_{base}.json"  # bench/train_step.py's printed JSON: per row its cpu_s_per_step
METHOD_BYTES = "method_bytes_{base}.json"  # bench/method_bytes.py: every method's files at its default config
ROWS_METHODS = "rows_methods_{base}.json"  # bench/rows_batched.py: 16 users batched, every per-row method
INCONTEXT = "incontext_cost_{base}.json"  # bench/incontext_cost.py: the in-context baseline served beside norm rows
METHOD_OF = {"norm": "norm", "lora-r4": "lora"}  # a format row -> its method's name in the results files


def human(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def cpu_minutes(base: str, fmt: str) -> tuple[str, str]:
    step = load(TRAIN_STEP_RESULT.format(base=base))
    row = METHOD_OF[fmt]
    if step and "cpu_s_per_step" in step.get(row, {}):
        return (f"{step[row]['cpu_s_per_step'] * STEPS / 60:.1f}",
                f"measured: {TRAIN_STEP_RESULT.format(base=base)}, bench/train_step.py, fp32, 1 thread")
    if (base, fmt) in CPU_S_PER_STEP:
        s, src = CPU_S_PER_STEP[(base, fmt)]
        return f"{s * STEPS / 60:.1f}", f"measured: {src}"
    return "not measured", ""


def served(base: str, method: str | None) -> str:
    """Decode throughput of 16 users of this method in one batch over 16 norm users' (bench/rows_batched.py)."""
    r = (load(ROWS_METHODS.format(base=base)) or {}).get("result", {})
    if method is None or method not in r or "norm" not in r:
        return ""
    return f"{r[method]['batched_tok_s'] / r['norm']['batched_tok_s']:.2f}x ({ROWS_METHODS.format(base=base)})"


def method_rows(base: str, users: int) -> list[dict]:
    """The KB-scale methods beside norm and LoRA: file bytes measured at their default configs."""
    found = load(METHOD_BYTES.format(base=base))
    if not found:
        return []
    out = []
    for method, m in found["methods"].items():
        if method in ("norm", "lora"):
            continue
        out.append({"base": base, "format": f"{method} fp16 (default config, {m['numbers']:,} numbers; int8 file "
                                            f"{m['int8_bytes']:,} B)",
                    "bytes": m["fp16_bytes"], "fleet": m["fp16_bytes"] * users,
                    "bytes_src": f"measured: {METHOD_BYTES.format(base=base)}", "cpu_min": "not measured",
                    "cpu_src": "", "ppl_vs_raw": "1 (raw)", "ppl_src": "",
                    "served": served(base, method) if m["per_row"] else "not served per row"})
    return out


def incontext_row(base: str, users: int) -> list[dict]:
    """The in-context baseline (adapter_frontier): no adapter, the user's last ~7.9k tokens of text prefilled before
    every request (bench/incontext_cost.py: stored as text, served beside norm rows on the same engine)."""
    r = load(INCONTEXT.format(base=base))
    if not r:
        return []
    text, ic, norm = r["prefix_text_bytes"]["median"], r["result"]["incontext"], r["result"]["norm"]
    return [{"base": base, "format": f"in-context: the user's last {r['prefix']:,} tokens as a prefix (no adapter; "
                                     f"time to first token {ic['first_token_s'] / norm['first_token_s']:.0f}x norm's; "
                                     f"{ic['per_user_bytes'] / 1e6:.0f} MB of KV per user if cached instead)",
             "bytes": text, "fleet": text * users,
             "bytes_src": f"measured: {INCONTEXT.format(base=base)}, median UTF-8 text of the 12 chat senders' prefixes",
             "cpu_min": "0", "cpu_src": "no training", "ppl_vs_raw": "", "ppl_src": "",
             "served": f"{ic['tok_s'] / norm['tok_s']:.3f}x ({INCONTEXT.format(base=base)}, {r['users']} users)"}]


def rows(users: int) -> list[dict]:
    out = []
    for base, trainable in TRAINABLE.items():
        for fmt in ("norm", "lora-r4"):
            nbytes = 2 * trainable[fmt] + HEADER[fmt]
            src = "measured: the file" if base == "smollm2-135m-instruct" else "arithmetic"
            measured = (load(METHOD_BYTES.format(base=base)) or {}).get("methods", {}).get(METHOD_OF[fmt])
            if measured:
                nbytes, src = measured["fp16_bytes"], f"measured: {METHOD_BYTES.format(base=base)}"
            cpu, cpu_src = cpu_minutes(base, fmt)
            out.append({"base": base, "format": f"{fmt} fp16", "bytes": nbytes, "fleet": nbytes * users,
                        "bytes_src": src,
                        "cpu_min": cpu, "cpu_src": cpu_src, "ppl_vs_raw": "1 (raw)", "ppl_src": "",
                        "served": served(base, METHOD_OF[fmt])})
        out += method_rows(base, users) + incontext_row(base, users)
        comp = load(f"lora_compress_{base}.json")
        if comp:  # each user gets what `compress --policy` ships for them
            chosen = [u["schemes"][u["policy"]] for u in comp["users"].values()]
            specs = sorted({u["policy"] for u in comp["users"].values()})
            counts = ", ".join(f"{sp} x{sum(u['policy'] == sp for u in comp['users'].values())}" for sp in specs)
            nbytes = sum(c["bytes"] for c in chosen) / len(chosen)
            ratios = [c["ppl_vs_raw"] for c in chosen]
            out.append({"base": base, "format": f"lora-r4, compressed per user by the policy ({counts})",
                        "bytes": nbytes, "fleet": nbytes * users,
                        "bytes_src": f"measured, mean of the chosen files: lora_compress_{base}.json",
                        "cpu_min": "+ seconds", "cpu_src": "compression only",
                        "ppl_vs_raw": f"{min(ratios):.4f}-{max(ratios):.4f}",
                        "ppl_src": f"measured, {len(chosen)} users' held-out text"})
        else:
            out.append({"base": base, "format": "lora-r4, compressed", "bytes": None, "fleet": None,
                        "bytes_src": "not measured", "cpu_min": "", "cpu_src": "", "ppl_vs_raw": "not measured",
                        "ppl_src": ""})
        joint = load(f"lora_joint_{base}.json")
        if joint and "4" in joint["joint"]:
            j = joint["joint"]["4"]
            own = [j["ppl"][u][u] / joint["raw"]["ppl"][u][u] for u in j["ppl"]]
            out.append({"base": base, "format": "lora-r4, joint core K = 4", "bytes": j["bytes_per_user"],
                        "fleet": j["bytes_per_user"] * users + j["shared_bytes"],
                        "bytes_src": f"measured: lora_joint_{base}.json; + {human(j['shared_bytes'])} shared once",
                        "cpu_min": "+ seconds", "cpu_src": "compression only",
                        "ppl_vs_raw": f"{min(own):.4f}-{max(own):.4f}",
                        "ppl_src": f"measured, a cohort of {len(own)} users; at fleet scale unmeasured"})
        else:
            core = 7 * LAYERS[base] * 16 * 2 + (8_976 - 7 * 30 * 16 * 2)  # K = 4 cores, fp16, + the 135M header
            out.append({"base": base, "format": "lora-r4, joint core K = 4", "bytes": core, "fleet": core * users,
                        "bytes_src": "arithmetic; + shared bases once", "cpu_min": "", "cpu_src": "",
                        "ppl_vs_raw": "not measured", "ppl_src": ""})
    for r in out:  # compressed and joint LoRAs are served as the LoRA they decode to
        r.setdefault("served", served(r["base"], "lora") if r["format"].startswith("lora-r4") else "")
    return out


def markdown(table: list[dict], users: int) -> str:
    lines = [f"| base | format | bytes / user | {users:,} users | CPU-min / user (100 steps) | held-out ppl / raw | "
             "served, 16 users batched / norm's |", "|---|---|---:|---:|---:|---|---|"]
    for r in table:
        b = "not measured" if r["bytes"] is None else f"{r['bytes']:,.0f} ({r['bytes_src']})"
        f = "" if r["fleet"] is None else human(r["fleet"])
        cpu = f"{r['cpu_min']} ({r['cpu_src']})" if r["cpu_src"] else r["cpu_min"]
        ppl = f"{r['ppl_vs_raw']} ({r['ppl_src']})" if r["ppl_src"] else r["ppl_vs_raw"]
        lines.append(f"| {r['base']} | {r['format']} | {b} | {f} | {cpu} | {ppl} | {r.get('served', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=215_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = rows(args.users)
    print(json.dumps(table, indent=1) if args.json else markdown(table, args.users))


if __name__ == "__main__":
    main()
