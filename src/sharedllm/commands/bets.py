"""sharedllm bets: the bets as a whole: `report` writes REPORT.md and plots from the result files; `list` lists them."""
from __future__ import annotations

from pathlib import Path

from .bet import add_bets_dir

HELP = "bets overview: `report` writes <bets dir>/REPORT.md + PNG plots from the results; `list` shows them"


def configure(p) -> None:
    p.add_argument("action", choices=["report", "list"])
    p.add_argument("--quick", action="store_true", help="use the --quick results (results/quick/)")
    p.add_argument("--results", default=None, help="folder of result JSON files")
    p.add_argument("--report", default=None, help="where to write the report (default <bets dir>/REPORT.md)")
    add_bets_dir(p)


def run(args) -> dict:
    from ..bets import catalogue, report

    bets = catalogue.use(args.bets_dir)
    folder = Path(args.results) if args.results else bets.results / "quick" if args.quick else bets.results
    if args.action == "list":
        found = report.load_results(folder)
        return {"bets_dir": str(bets.path), "results": str(folder),
                "bets": {b: found[b]["verdict"] if b in found else None for b in bets.bets}}
    default = not (args.quick or args.results or args.report)
    dest = Path(args.report) if args.report else folder / "REPORT.md" if not default else bets.report
    return report.write_report(folder, dest, readme=bets.default("README") if default else None)


def render(r: dict) -> str:
    if "bets" in r and isinstance(r["bets"], dict):
        return "\n".join([f"bets dir {r['bets_dir']}"] + [f"{b:16s} {v or '-'}" for b, v in r["bets"].items()])
    lines = [f"wrote {r['report']} ({len(r['with_results'])}/{r['bets']} bets with results, {len(r['plots'])} plots)"]
    if r.get("unchanged"):
        lines[0] += "; unchanged but for its date, so left as it was"
    if r.get("readme"):
        lines.append(f"  regenerated the bets block of {r['readme']}")
    lines += [f"  {b:16s} {v}" for b, v in r["verdicts"].items()]
    if r["missing"]:
        lines.append(f"  no result yet: {', '.join(r['missing'])}")
    if r.get("not_discriminating"):
        lines.append(f"  passes a control meets too (not discriminating): {', '.join(r['not_discriminating'])}")
    if r["mismatches"]:
        lines.append(f"  VERDICT MISMATCH on recompute: {', '.join(r['mismatches'])}")
    return "\n".join(lines)
