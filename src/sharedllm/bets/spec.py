"""What a bet is and how it is run (Bet, Options, grading words), apart from the machinery that runs it (harness,
context, ray_units import this; it imports none of them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sharedllm.errors import SharedLLMError
from sharedllm.registry import resolve as resolve_base

from .catalogue import current

DTYPES = ("fp32", "bf16")  # --dtype: the compute dtype of training and scoring (bf16: autocast, fp32 parameters)
VERDICTS = ("STRICT_PASS", "LENIENT_PASS", "FAIL", "CATASTROPHIC")
NOT_RUN = "not run"  # how a control verdict starts when the cells it needs are not in the result


class MissingDependency(SharedLLMError):
    """A bet needs a piece of the package that this checkout does not have yet (no result is written)."""


@dataclass
class Bet:
    id: str
    slug: str
    version: int
    hypothesis: str
    criteria: dict
    run: Callable
    verdict: Callable
    summary: Callable  # cells -> one line of key numbers for REPORT.md
    accepts: tuple = ()  # extra options this bet understands: users, seeds, full_ft, ternary, random_users, eval_len
    side_verdicts: Callable | None = None  # (cells, criteria) -> {name: verdict}, reported beside the verdict
    # (cells, criteria) -> {control name: verdict, or a "not run: ..." line}: the same rule applied to controls that
    # could meet it without the thing under test (the bare base, an adapter of random tokens, ...)
    controls: Callable | None = None
    borrow: tuple = ()  # (bet id, {cell selector}): control cells another result may lend (report.lent_cells)

    @property
    def name(self) -> str:
        return f"{self.id}_{self.slug}" if self.id != self.slug else self.id


@dataclass
class Options:
    quick: bool = False
    force: bool = False
    base: str | None = None
    corpora: Path | None = None  # None: the bets dir's CORPORA
    device: str = "cpu"
    out: Path | None = None  # None: the bets dir's OUT
    results: Path | None = None
    users: list | None = None
    seeds: int | None = None
    full_ft: bool = False
    ternary: str | None = None
    random_users: int | None = None  # scale_protocol: the random-token control for the first N users only
    eval_len: int | None = None  # tokens per eval text (None: the bets' 2,048); recorded in the stamp and config
    ray: str | None = None  # run the units as Ray tasks: "local" (a local instance) or a cluster address
    ray_retries: int = 2
    dtype: str = "fp32"  # "bf16": train and score under torch.autocast(bf16); see sharedllm.bets.common.autocast
    fleet: int = 2  # norm adapters a bet trains together in one pass (Context.train_together); 1: each alone
    frozen_bf16: bool = False  # with dtype bf16: matmul weights held in bf16 (sharedllm.train.hold_frozen_in_bf16)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("random_users", "eval_len", "fleet"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SharedLLMError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.dtype not in DTYPES:
            raise SharedLLMError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.frozen_bf16 and (self.dtype != "bf16" or self.full_ft):
            raise SharedLLMError("--frozen-bf16 needs --dtype bf16 and no --full-ft (full fine-tuning trains the "
                                 "matmul weights it would hold in bf16)")
        for name in ("corpora", "out"):
            if getattr(self, name) is None:
                setattr(self, name, _default(name))

    @property
    def base_spec(self) -> str:
        return self.base or ("tiny" if self.quick else "default")

    def result_dir(self) -> Path:
        """--results, else results/ (the default base), results/other/<base>/, results/quick/. A run in another
        dtype than fp32 gets a folder of its own (results/other/<base>-bf16/, results/quick/bf16/): its result
        must not be reused as the fp32 one, nor its checkpoint (stamped with the dtype) replace the fp32 one's."""
        if self.results is not None:
            return Path(self.results)
        results, fp32 = current().results, self.dtype == "fp32"
        if self.quick:
            return results / "quick" / ("" if fp32 else self.dtype)
        named = resolve_base(self.base_spec)
        default = named is resolve_base("default")  # `default` or its full name
        if fp32:
            return results if default else results / "other" / Path(self.base_spec).name
        return results / dtype_folder(named.name if default else Path(self.base_spec).name, self.dtype)


def dtype_folder(base_name: str, dtype: str) -> str:
    """Where a run in another compute dtype than fp32 lands, under the results folder: other/<base>-<dtype>."""
    return f"other/{base_name}-{dtype}"


def default_dtype_folders() -> list:
    """The default base's runs in each other dtype (e.g. other/smollm2-135m-instruct-bf16), as result_dir names them."""
    return [dtype_folder(resolve_base("default").name, d) for d in DTYPES if d != "fp32"]


def _default(name: str) -> Path:
    path = current().default(name.upper())
    if path is None:
        raise SharedLLMError(f"the bets dir {current().path} names no default {name.upper()}: pass --{name} DIR")
    return path


def get_bet(bet_id: str) -> Bet:
    """A bet of the current bets dir by id (13), module name (13_ternary_ptq) or slug (ternary_ptq)."""
    catalogue, key = current(), str(bet_id)
    bets = catalogue.bets
    if key not in bets:
        match = [k for k, m in bets.items() if m == key or m.split("_", 1)[-1] == key]
        if not match:
            raise SharedLLMError(f"unknown bet {bet_id!r} in {catalogue.path}; choose from {', '.join(bets)}")
        key = match[0]
    return catalogue.module(bets[key]).BET


def grade(strict: bool, lenient: bool, catastrophic: bool) -> str:
    """The one verdict order: CATASTROPHIC first, then STRICT_PASS, LENIENT_PASS, else FAIL."""
    if catastrophic:
        return "CATASTROPHIC"
    return "STRICT_PASS" if strict else "LENIENT_PASS" if lenient else "FAIL"


def not_run(why: str) -> str:
    return f"{NOT_RUN}: {why}"


def grade_users(won: int, lost: int, criteria: dict) -> str:
    """The per-user head-to-head rule: STRICT / LENIENT by users won, CATASTROPHIC by users lost."""
    return grade(won >= criteria["STRICT"]["min_users_won"], won >= criteria["LENIENT"]["min_users_won"],
                 lost >= criteria["CATASTROPHIC"]["min_users_lost"])
