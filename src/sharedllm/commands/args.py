"""Argument helpers shared by several subcommands (base, training, evaluation), and turning them into configs."""
from __future__ import annotations

import argparse
import dataclasses

from ..adapters import METHODS, get_method
from ..errors import SharedLLMError
from ..base import base_name, load_base
from ..log import say
from ..recipes import RECIPES, Recipe, given_lr, recipe_lr
from ..train import TrainConfig, bf16_matmuls, hold_frozen_in_bf16


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into `argument --x: invalid ... value`)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


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
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the recommended one for the method and base, from the lr_sensitivity "
                        "bet: norm 2e-3, lora 1e-3, full 5e-5 on the default base; see sharedllm.recipes)")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help=f"where the lr comes from when --lr is not given: recommended (default) or catalogue "
                        f"(the research catalogue's {d.lr:g} for every method)")
    p.add_argument("--seed", type=int, default=d.seed)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--window", type=int, default=256, help="evaluation window length in tokens")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="score at most this many held-out tokens (0 = the whole held-out slice)")


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch=args.batch, seq=args.seq, lr=train_recipe(args).lr, seed=args.seed,
                       budget_s=args.budget_s)


def train_recipe(args) -> Recipe:
    """The lr to train at and where it comes from: --lr if given, else --recipe (default recommended) for
    args.method on args.base (sharedllm.recipes)."""
    if args.lr is not None:
        if args.recipe is not None:
            raise SharedLLMError(f"give --lr or --recipe, not both (--lr {args.lr:g} --recipe {args.recipe})")
        return given_lr(args.lr)
    return recipe_lr(getattr(args, "method", "norm"), base_name(args.base), args.recipe or "recommended")


def add_method_args(p: argparse.ArgumentParser, default: str = "norm") -> None:
    """--method, and one --METHOD-FIELD option per field of each method's config (e.g. --lora-rank), typed and
    defaulted from the config dataclass; tuple fields take comma-separated values."""
    p.add_argument("--method", default=default, help=" | ".join(sorted(METHODS)))  # unknown: get_method's error
    for name, method in sorted(METHODS.items()):
        for f in dataclasses.fields(method.config):
            value = getattr(method.config, f.name)
            kind = _comma_list if isinstance(value, tuple) else type(value)
            shown = ",".join(value) if isinstance(value, tuple) else value
            p.add_argument(f"--{name}-{f.name.replace('_', '-')}", dest=_dest(name, f.name), type=kind, default=None,
                           help=f"{name} adapters: {f.name} (default {shown})")


def _comma_list(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _dest(method: str, field: str) -> str:
    return f"method_{method}_{field}"


def method_config(args):
    """The config of args.method with the --METHOD-FIELD options given; refuses options of another method."""
    given = {(m, f.name): getattr(args, _dest(m, f.name), None) for m, impl in METHODS.items()
             for f in dataclasses.fields(impl.config)}
    given = {k: v for k, v in given.items() if v is not None}
    other = sorted(f"--{m}-{f.replace('_', '-')}" for m, f in given if m != args.method)
    if other:
        raise SharedLLMError(f"{', '.join(other)} do not apply to --method {args.method}")
    default = get_method(args.method).config
    return dataclasses.replace(default, **{f: v for (_, f), v in given.items()})


def read_group(group_path: str) -> bytes:
    """--on-top GROUP: the group file's bytes (checked where they are used: stacked_base, stack.check_group)."""
    from pathlib import Path

    if not Path(group_path).is_file():
        raise SharedLLMError(f"--on-top {group_path}: no such file")
    return Path(group_path).read_bytes()


def load_group(base, group_path: str):
    """--on-top GROUP: (the base with the group adapter merged into a copy, the `on_top` metadata naming the group
    file, the group file's bytes)."""
    from pathlib import Path

    from .. import stack
    from ..personalise import stacked_base

    data = read_group(group_path)
    stacked = stacked_base(base, data, group_path)
    say(f"training on top of group adapter {group_path} ({stacked.meta[stack.ON_TOP]['method']}, merged into a copy "
        "of the base)")
    return stacked, stack.on_top_meta(Path(group_path), stacked), data


def load_for_training(args):
    """The base, its matmul weights held in bf16 when a norm adapter trains under bf16 autocast: the same numbers
    (sharedllm.train.hold_frozen_in_bf16), less CPU and memory. LoRA keeps fp32 weights (PEFT would round its
    random init to bf16), and so does fp32."""
    say(f"loading base {args.base}")
    base = load_base(args.base, args.device)
    if args.dtype == "bf16" and get_method(args.method).caps.frozen_bf16:
        hold_frozen_in_bf16(base.model)
    if args.dtype == "bf16" and bf16_matmuls(args.device) == "emulated":
        say("this CPU has no native bf16 matmuls (no AVX512_BF16 / AMX): bf16 runs as fp32 GEMMs on bf16 values, "
            "the same numbers but slower than --dtype fp32 here")
    return base
