"""Argument helpers shared by several subcommands (base, training, evaluation), and turning them into configs."""
from __future__ import annotations

import argparse

from ..train import TrainConfig


def add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="default",
                   help="default (embedded SmolLM2-135M-Instruct) | a named base (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b; "
                        "`sharedllm bases`) | tiny | HF checkpoint DIR | ternary base FILE")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--budget-s", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq", type=int, default=d.seq)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=256, help="evaluation window length in tokens")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="score at most this many held-out tokens (0 = the whole held-out slice)")


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, seed=args.seed,
                       budget_s=args.budget_s)
