"""sharedllm bet: run one pre-registered bet of a bets dir (the checkout's experiments/bets/) and print its verdict.

Building the parser imports no bets code: the runtime (sharedllm.bets) and the bet modules load when the command
runs, so every other subcommand stays free of them."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("run a pre-registered bet by id (e.g. 49, scale_protocol, chat_scale; `sharedllm bets list` lists them); "
        "results and checkpointed units are reused")


def add_bets_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bets-dir", default=None,
                   help="folder of bet modules and results (default: $SHAREDLLM_BETS_DIR, else the source "
                        "checkout's experiments/bets)")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="bet id, e.g. 49 or scale_protocol")
    add_options(p)
    add_bets_dir(p)


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny base, a few steps, tiny eval texts (seconds)")
    p.add_argument("--force", action="store_true", help="re-run even if the result file exists")
    p.add_argument("--base", default=None,
                   help="default | a named base (`sharedllm bases`) | tiny | HF dir | ternary base file (quick: tiny)")
    p.add_argument("--corpora", default=None, help="folder of <kind>/<user>.txt corpora (default: the bets dir's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--out", default=None, help="artefact folder: trained adapters, score cache (default: the bets dir's)")
    p.add_argument("--results", default=None, help="folder for the result JSON (default <bets dir>/results)")
    p.add_argument("--users", nargs="+", default=None,
                   help="scale_protocol: user corpora (kind/name, files) or one corpora folder")
    p.add_argument("--seeds", type=int, default=None, help="scale_protocol / 46: number of training seeds")
    p.add_argument("--full-ft", action="store_true", help="scale_protocol: also train full fine-tunes")
    p.add_argument("--ternary", default=None, help="13 / 52 / scale_protocol: use this ternary base file")
    p.add_argument("--random-users", type=int, default=None, metavar="N",
                   help="scale_protocol: the random-token control for the first N users only (default: every user)")
    p.add_argument("--eval-len", type=int, default=None, metavar="TOKENS",
                   help="scale_protocol: tokens per eval text (default 2048; e.g. 1024 on a base too slow for it)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="compute dtype of training and scoring: bf16 runs them under torch.autocast (parameters, "
                        "optimizer state and NLL sums stay fp32); recorded in the result and the checkpoint stamp, "
                        "written to its own results folder (<base>-bf16)")
    p.add_argument("--frozen-bf16", action="store_true",
                   help="with --dtype bf16: hold the base's matmul weights in bf16 instead of casting fp32 ones at "
                        "every matmul: the same numbers for norm adapters (LoRA: its random init rounded to bf16), "
                        "half the weight memory, no casts; not with --full-ft")
    p.add_argument("--fleet", type=int, default=2, metavar="U",
                   help="norm adapters that share a base and a budget are trained U users per pass (sharedllm.fleet: "
                        "each equals training alone up to float rounding; 1.3-1.4x users/hour at U=2 on a CPU); "
                        "1 trains each alone. Used by scale_protocol and chat_cohort")
    p.add_argument("--ray", action="store_true",
                   help="run the bet's units as Ray tasks on a local Ray instance sized to this machine")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead (auto, ray://host:10001)")
    p.add_argument("--ray-retries", type=int, default=2, help="retries of a failed unit before it is recorded failed")


def _path(value):
    return Path(value) if value else None


def options_from(args):
    from ..bets.harness import Options

    return Options(quick=args.quick, force=args.force, base=args.base, corpora=_path(args.corpora),
                   device=args.device, out=_path(args.out), results=_path(args.results), users=args.users,
                   seeds=args.seeds, full_ft=args.full_ft, ternary=args.ternary,
                   random_users=args.random_users, eval_len=args.eval_len, dtype=getattr(args, "dtype", "fp32"),
                   fleet=getattr(args, "fleet", 2), frozen_bf16=getattr(args, "frozen_bf16", False),
                   ray=args.ray_address or ("local" if args.ray else None), ray_retries=args.ray_retries)


def run(args) -> dict:
    from ..bets import catalogue, harness

    catalogue.use(args.bets_dir)
    return harness.run_bet(harness.get_bet(args.id), options_from(args))


def render(result: dict) -> str:
    from ..bets.harness import render as render_result

    return render_result(result)
