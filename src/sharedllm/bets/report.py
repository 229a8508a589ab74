"""REPORT.md and plots from the committed result files: one line per bet, verdicts recomputed from cells.

What is particular to a bet comes from hooks its module may define: `plots(results, folder) -> [files written]`
and `report_section(results_dir, plots_dir, root) -> [markdown lines]`; this module names no bet."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from sharedllm.atomic import write_text_atomic
from sharedllm.errors import SharedLLMError

from .catalogue import current
from .cells import select
from .harness import NOT_RUN, get_bet
from .spec import default_dtype_folders


def result_file(folder: Path, module: str) -> Path | None:
    """A bet's result on the default base: `folder`/<module>.json (fp32), else, for a bet run only in another compute
    dtype (run with --dtype bf16 to fit the machine), `folder`/other/<default base>-bf16/<module>.json;
    REPORT and README then name the dtype in the bet's row."""
    for sub in ("", *default_dtype_folders()):
        path = Path(folder) / sub / f"{module}.json"
        if path.is_file():
            return path
    return None


def load_results(folder: Path) -> dict:
    """bet id -> result dict, for every result file of a registered bet (see `result_file`)."""
    out = {}
    for bet_id, module in current().bets.items():
        path = result_file(folder, module)
        if path is not None:
            out[bet_id] = json.loads(path.read_text())
    return out


class Run(NamedTuple):
    """One run of a bet on one base: its finished result, else its checkpoint (result None, the units so far)."""
    base: str
    dtype: str
    cells: list
    result: dict | None = None
    units: tuple = ()

    @property
    def partial(self) -> bool:
        return self.result is None


def runs_of(results_dir: Path, module: str) -> list:
    """Every run of bet module `module`: `results_dir` (the default base) and each results/other/<base>[-dtype]/
    folder, a finished result where there is one, else its checkpoint (partial/<module>.json); by base size."""
    from sharedllm import registry

    runs = []
    for folder in [Path(results_dir)] + sorted(Path(results_dir, "other").glob("*")):
        done, part = folder / f"{module}.json", folder / "partial" / f"{module}.json"
        if done.is_file():
            r = json.loads(done.read_text())
            runs.append(Run(r["config"]["base"], r["config"].get("dtype", "fp32"), r["cells"], r))
        elif part.is_file():
            data = json.loads(part.read_text())
            dtype = data.get("stamp", {}).get("dtype", "fp32")
            base = folder.name.removesuffix(f"-{dtype}") if folder != Path(results_dir) else \
                registry.resolve("default").name
            units = data.get("units", {})
            runs.append(Run(base, dtype, [c for u in units.values() for c in u.get("cells", [])], None, tuple(units)))
    size = {nb.name: nb.params for nb in registry.BASES.values()}
    return sorted(runs, key=lambda run: size.get(run.base, 0))


def dtype_note(r: dict) -> str:
    """" (bf16 autocast)" for a result computed in another dtype than fp32, else ""."""
    dtype = r["config"].get("dtype", "fp32")
    return "" if dtype == "fp32" else f" ({dtype} autocast)"


def recomputed(result: dict) -> str:
    """The verdict recomputed from the file's own cells and criteria by the bet's pure verdict function."""
    return get_bet(result["bet"]).verdict(result["cells"], result["criteria"])


def side_verdicts(result: dict) -> dict:
    """Side verdicts recomputed from the file's cells (old results get them without re-running)."""
    bet = get_bet(result["bet"])
    return bet.side_verdicts(result["cells"], result["criteria"]) if bet.side_verdicts is not None else {}


SAME_RUN = ("base_fingerprint", "eval", "users", "steps", "batch", "seq", "lr")  # config keys a lender must share


def lent_cells(result: dict, results: dict) -> list:
    """Control cells the bet may borrow from another committed result (`Bet.borrow`) when its own cells lack them
    and both ran on the same base, users, budget and eval texts; each lent cell says where it came from."""
    out = []
    for lender, where in get_bet(result["bet"]).borrow:
        other = results.get(lender)
        if select(result["cells"], **where) or other is None:
            continue
        if all(other["config"].get(k) == result["config"].get(k) for k in SAME_RUN):
            out += [{**c, "lent_by": lender} for c in select(other["cells"], **where)]
    return out


def control_verdicts(result: dict, results: dict) -> dict | None:
    """{control: verdict or "not run: ..."} by the bet's own rule, recomputed from the committed cells (plus lent
    ones); None when the bet defines no control."""
    bet = get_bet(result["bet"])
    if bet.controls is None:
        return None
    lent = lent_cells(result, results)
    out = bet.controls(result["cells"] + lent, result["criteria"])
    if lent:
        out = {f"{k} (cells lent by bet {lent[0]['lent_by']})": v for k, v in out.items()}
    return out


PASS_RANK = {"STRICT_PASS": 2, "LENIENT_PASS": 1}


def discriminating(verdict: str, controls: dict | None) -> bool:
    """False when the bet passes and a control reaches the same pass tier (or a higher one) by the same rule."""
    rank = PASS_RANK.get(verdict, 0)
    return not (rank and any(PASS_RANK.get(v, 0) >= rank for v in (controls or {}).values()))


def control_column(controls: dict | None) -> str:
    """REPORT.md's "a control passes too?": yes / no / not run, then each control's verdict."""
    if controls is None:
        return "no control defined"
    detail = "; ".join(f"{k} ({v[len(NOT_RUN) + 2:]})" if v.startswith(NOT_RUN) else f"{k} {v}"
                       for k, v in controls.items())
    if any(v in PASS_RANK for v in controls.values()):
        return f"yes: {detail}"
    if any(v.startswith(NOT_RUN) for v in controls.values()):
        return f"not run: {detail}" if all(v.startswith(NOT_RUN) for v in controls.values()) else f"not known: {detail}"
    return f"no: {detail}"


def write_report(results_dir: Path, report: Path, plots_dir: Path | None = None, readme: Path | None = None) -> dict:
    """REPORT.md and plots from the result files; with `readme`, also the generated bets block of that README.
    A report that would differ only in its generation date is left as it is (no churn in the committed one)."""
    results, bets = load_results(results_dir), current().bets
    plots_dir = Path(plots_dir or Path(results_dir) / "plots")
    plots = make_plots(results, plots_dir)
    text = render_markdown(results, plots, Path(report).parent, in_progress(results_dir))
    text += "".join(line + "\n" for line in extra_sections(results_dir, plots_dir, Path(report).parent))
    unchanged = Path(report).is_file() and _undated(Path(report).read_text()) == _undated(text)
    if not unchanged:
        write_text_atomic(report, text)
    if readme is not None:
        write_text_atomic(readme, with_readme_block(Path(readme).read_text(), results, results_dir))
    controls = {b: control_verdicts(r, results) for b, r in results.items()}
    return {"report": str(report), "unchanged": unchanged, "bets": len(bets), "with_results": sorted(results),
            "plots": plots, "missing": [b for b in bets if b not in results], "in_progress": in_progress(results_dir),
            "verdicts": {b: r["verdict"] for b, r in results.items()}, "controls": controls,
            "readme": str(readme) if readme is not None else None,
            "not_discriminating": [b for b, r in results.items() if not discriminating(r["verdict"], controls[b])],
            "mismatches": [b for b, r in results.items() if recomputed(r) != r["verdict"]
                           or side_verdicts(r) != r.get("side_verdicts", side_verdicts(r))]}


# ---- the README's bets block: generated from the results, so the numbers it quotes cannot drift ----

BEGIN = "<!-- bets:begin: generated by `sharedllm bets report` from experiments/bets/results/*.json; edits here are overwritten -->"
END = "<!-- bets:end -->"


def readme_line(bet_id: str, r: dict, results: dict) -> str:
    bet, controls = get_bet(bet_id), control_verdicts(r, results)
    verdict = f"**{r['verdict']}**"
    if not discriminating(r["verdict"], controls):
        passing = [f"{k} {v}" for k, v in controls.items() if PASS_RANK.get(v, 0) >= PASS_RANK[r["verdict"]]]
        verdict += f", **not discriminating** (a control meets it too: {'; '.join(passing)})"
    unrun = [k for k, v in (controls or {}).items() if v.startswith(NOT_RUN)]
    verdict += f" (control not run yet: {'; '.join(unrun)})" if unrun else ""
    sides = "".join(f"; {k}: {v}" for k, v in side_verdicts(r).items())
    version = f" v{r['version']}" if r["version"] > 1 else ""
    return f"- {bet.name}{version}{dtype_note(r)}: {verdict}{sides}. {bet.summary(r['cells'])}"


def readme_block(results: dict, results_dir: Path | None = None) -> str:
    """The bets block: a line per default-base result, then the lines bet modules add from every base's results
    (`readme_section(results_dir) -> lines`)."""
    bases = ", ".join(sorted({r["config"]["base"] for r in results.values()}))
    lines = [BEGIN, "", f"Committed results on the default base ({bases}); verdicts, controls and numbers are recomputed "
             "from the cells (\"not discriminating\": a control without the thing under test passes the same rule):",
             ""]
    bets = current().bets
    lines += [readme_line(b, results[b], results) for b in bets if b in results]
    weak = [bets[b] for b, r in results.items() if not discriminating(r["verdict"], control_verdicts(r, results))]
    missing = [bets[b] for b in bets if b not in results]
    lines += [""] + ([f"Passes a control meets too (not discriminating): {', '.join(weak)}."] if weak else [])
    lines += [f"No full result yet: {', '.join(missing)}."] if missing else []
    lines += [line for section in hooks("readme_section") for line in section(Path(results_dir or current().results))]
    return "\n".join(lines + [END])


def with_readme_block(text: str, results: dict, results_dir: Path | None = None) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"the README has no generated bets block ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    return head + readme_block(results, results_dir) + rest.split(END, 1)[1]


def in_progress(folder: Path) -> dict:
    """bet id -> units checkpointed so far, for bets with a partial run under `folder`/partial/."""
    out = {}
    for bet_id, module in current().bets.items():
        path = Path(folder) / "partial" / f"{module}.json"
        if path.is_file():
            out[bet_id] = sorted(json.loads(path.read_text()).get("units", {}))
    return out


DATED = re.compile(r"Generated by `sharedllm bets report` on [0-9-]+ [0-9:]+ UTC")


def _undated(text: str) -> str:
    return DATED.sub("", text, count=1)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def render_markdown(results: dict, plots: list, root: Path, partial: dict | None = None) -> str:
    lines = ["# Bets: results on the default base", "",
             f"Generated by `sharedllm bets report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from "
             "`experiments/bets/results/*.json`. Every verdict below is recomputed from the file's cells and "
             "criteria by the bet's own pure `verdict` function (a mismatch would be flagged), and the key numbers by its "
             "`summary` function from the same cells.", "",
             "Perplexity is token perplexity of the base's tokenizer over non-overlapping 256-token windows, pooled "
             "over three disjoint 2,048-token eval texts from the last 20 % of each user's file (train: first 80 %). "
             "Budget: 100 steps of 2 x 256 tokens, AdamW lr 5e-5, betas (0.9, 0.95), seed 0 unless stated.", "",
             "The controls column applies each bet's own rule to the controls that could meet it without the thing "
             "under test (the bare base at 0 bytes, a file decoding to the base's own gains, an adapter trained on "
             "random tokens, another user's adapter); a pass a control also meets does not discriminate. Side "
             "verdicts (after the verdict) are recomputed from the cells too.", "",
             "| bet | hypothesis | verdict | a control passes too? | key numbers | wall | commit |",
             "|---|---|---|---|---|---|---|"]
    for bet_id, module in current().bets.items():
        r = results.get(bet_id)
        if r is None:
            hyp, units = get_bet(bet_id).hypothesis, (partial or {}).get(bet_id)
            status = (f"in progress: {len(units)} unit(s) checkpointed in results/partial/ ({', '.join(units)}); "
                      f"`sharedllm bet {bet_id}` resumes") if units else "see LOG / the bet's notes"
            lines.append(f"| {module} | {_cell(hyp)} | *no full result* | | {_cell(status)} | | |")
            continue
        lines.append(report_row(module, r, results))
    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({os.path.relpath(p, root)})" for p in plots] or ["(none yet)"]
    return "\n".join(lines) + "\n"


def report_row(module: str, r: dict, results: dict) -> str:
    check = "" if recomputed(r) == r["verdict"] else " (MISMATCH on recompute)"
    sides = side_verdicts(r)
    check += "" if sides == r.get("side_verdicts", sides) else " (side verdicts MISMATCH on recompute)"
    side = "".join(f"; {k}: {v}" for k, v in sides.items())
    version = (f" (version {r['version']})" if r["version"] > 1 else "") + dtype_note(r)
    wall = f"{r['meta']['wall_s'] / 60:.1f} min"
    if r["meta"].get("resumed"):  # a checkpointed run: the last pass, and every unit's time summed
        wall += f" (units: {r['meta']['resumed']['wall_s_all_units'] / 3600:.1f} h)"
    controls = control_verdicts(r, results)
    flag = "" if discriminating(r["verdict"], controls) else " (not discriminating)"
    return (f"| {module} | {_cell(r['hypothesis'])} | **{r['verdict']}**{version}{flag}{check}{side} | "
            f"{_cell(control_column(controls))} | {_cell(get_bet(r['bet']).summary(r['cells']))} | {wall} | "
            f"{r['meta']['git_commit'][:8]} |")


def extra_sections(results_dir: Path, plots_dir: Path, root: Path) -> list:
    """Sections bet modules add to the report (`report_section(results_dir, plots_dir, root) -> lines`, e.g. a
    table across bases), in the bets dir's order."""
    sections = hooks("report_section")
    return [line for section in sections for line in section(Path(results_dir), Path(plots_dir), root)]


def hooks(name: str, modules: list | None = None) -> list:
    """The function `name` of every bet module that defines one, in the order of `modules` (default: report order)."""
    found = (getattr(current().module(m), name, None) for m in (modules or current().bets.values()))
    return [f for f in found if f is not None]


# ---- plots (matplotlib, Agg: the `bets` extra) ----

def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise SharedLLMError('the bets report draws plots with matplotlib: pip install "sharedllm[bets]" '
                             '(in a checkout: pip install -e ".[bets]")') from None
    matplotlib.use("Agg")
    return matplotlib


def make_plots(results: dict, folder: Path) -> list:
    """The plots of every bet module that defines `plots(results, folder) -> [files written]` (results: bet id ->
    result, all of them), in the bets dir's plot order."""
    _matplotlib()
    folder.mkdir(parents=True, exist_ok=True)
    return [str(p) for plots in hooks("plots", current().plot_order) for p in plots(results, folder)]
