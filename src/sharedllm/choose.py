"""The per-user format choice (`sharedllm adapt --method auto`, `choose_format`).

The rule (sharedllm.rule.judge, shared with `compress --policy`), on candidates that each have a size in bytes and
a dev ppl:

    best      = the lowest ppl of any candidate
    accepted  = ppl <= best x (1 + tolerance)   (inclusive: exactly at the tolerance is accepted)
                and ppl < the base's ppl        (strict: equal to the base is no gain)
    ship      = the smallest accepted candidate (bytes, then ppl, then name)

If no candidate beats the base, nothing is accepted (the best is then no better than the base, and every other
candidate is no better than the best). `choose_format` then ships nothing: no adapter file is written, the table
says so, and `sharedllm adapt --method auto` exits 1 (this user is better served by the bare base). `compress
--policy` instead falls back to the raw adapter it was given, as fp16 (compress never drops an adapter).

`choose_format` trains every candidate format on the first (1 - dev_fraction) of the user's *training pool* and
scores it on the pool's last dev_fraction (the dev slice, 10 % by default), never on the held-out 20 %
(data.split_by_position), which stays for reporting. The adapter it ships is the one it scored (trained on the
first 90 % of the pool), in the bytes scored: each candidate's file as written, before the choice record is
added to the shipped one's metadata.

A candidate format is METHOD[-rR][+SCHEME]: `norm`, `ia3`, `lora-r4` (a LoRA of rank R, alpha 2R: the default
scale), `lora-r4+int4-g64` (that LoRA re-encoded by `sharedllm compress --scheme int4-g64`; it trains once with
`lora-r4`), `lora-r4+rank2+float16` (truncated to rank 2).
"""
from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .rule import TOLERANCE, check_tolerance, judge, rule_text  # noqa: F401  (the rule, re-exported)

DEV_FRACTION = 0.1
DEFAULT_CANDIDATES = ("norm", "ia3", "lora-r4")


# ---- candidate formats ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    name: str  # as given (normalised: lora -> lora-r4)
    method: str
    config: object  # the method's config dataclass
    spec: str  # compression spec (sharedllm.quant.compress.parse_spec): float16 = as trained

    @property
    def trained(self) -> tuple:
        return (self.method, self.config)


_FORMAT = re.compile(r"(?P<method>[a-z0-9_]+?)(-r(?P<rank>[0-9]{1,4}))?(\+(?P<spec>.+))?")


def parse_format(text: str) -> Format:
    from .adapters import get_method
    from .errors import SharedLLMError
    from .quant.compress import parse_spec, spec_name
    from .quant.policy import RAW

    m = _FORMAT.fullmatch(text.strip())
    if not m:
        raise SharedLLMError(f"candidate {text[:40]!r}: give METHOD[-rR][+SCHEME], e.g. norm, lora-r4, "
                             "lora-r4+int4-g64")
    method = get_method(m["method"])
    config = method.config
    if m["rank"] is not None or hasattr(config, "rank"):
        if not hasattr(config, "rank"):
            raise SharedLLMError(f"candidate {text[:40]!r}: method {method.name!r} has no rank")
        rank = int(m["rank"]) if m["rank"] is not None else config.rank
        if hasattr(config, "alpha"):  # LoRA: alpha scales with the rank; vera, loraxs: a rank alone
            scale = config.alpha / config.rank
            config = dataclasses.replace(config, rank=rank, alpha=max(1, round(scale * rank)))
        else:
            config = dataclasses.replace(config, rank=rank)
    spec = spec_name(*parse_spec(m["spec"])) if m["spec"] else RAW
    head = f"{method.name}-r{config.rank}" if hasattr(config, "rank") else method.name
    return Format(head if spec == RAW else f"{head}+{spec}", method.name, config, spec)


def parse_candidates(text_or_list) -> list[Format]:
    from .errors import SharedLLMError

    items = text_or_list.split(",") if isinstance(text_or_list, str) else list(text_or_list)
    formats = [parse_format(x) for x in items if str(x).strip()]
    names = [f.name for f in formats]
    if not formats:
        raise SharedLLMError("give at least one candidate format")
    if len(set(names)) != len(names):
        raise SharedLLMError(f"candidate formats repeat: {', '.join(names)}")
    return formats


def dev_split(pool, fraction: float = DEV_FRACTION, seq: int = 1, window: int = 1):
    """The training pool's tokens -> (train part, dev slice): the dev slice is the pool's last `fraction`."""
    from .errors import SharedLLMError

    if not 0 < fraction < 1:
        raise SharedLLMError(f"dev fraction must be in (0, 1), got {fraction}")
    cut = int(len(pool) * (1 - fraction))
    train, dev = pool[:cut], pool[cut:]
    if len(train) < seq + 1 or len(dev) < window + 1:
        raise SharedLLMError(f"training pool of {len(pool)} tokens: its first {100 * (1 - fraction):g} % "
                             f"({len(train)}) must hold one training window ({seq + 1}) and its last "
                             f"{100 * fraction:g} % ({len(dev)}) one dev window ({window + 1}); give more text or "
                             "a smaller --seq / --window")
    return train, dev


# ---- the choice ---------------------------------------------------------------------------------------------
@dataclass
class Choice:
    table: dict  # what goes into the shipped file's metadata as `choice`
    data: bytes | None  # the shipped adapter file (with the choice recorded), None when nothing beats the base
    adapted: object = None  # the shipped adapter, loaded on the base (None likewise)


def choose_format(base, tokens, candidates=DEFAULT_CANDIDATES, tolerance: float = TOLERANCE, cfg=None,
                  window: int = 256, max_tokens: int | None = None, dev_fraction: float = DEV_FRACTION,
                  lr: float | None = None, recipe: str = "recommended", dtype: str = "fp32",
                  info: dict | None = None) -> Choice:
    """Train each candidate format on `tokens` (the user's training pool) less its dev slice, score each written
    file on the dev slice, and ship the rule's choice (module docstring). `cfg`: the TrainConfig (its lr is replaced
    per method by `lr` or the recipe's: sharedllm.recipes); `info`: extra metadata for every file (e.g. user_text)."""
    from . import wire
    from .personalise import evaluate_on, load_adapted, personalise, save_adapted
    from .quant.compress import encode_adapter
    from .quant.policy import RAW
    from .recipes import given_lr, recipe_lr
    from .train import TrainConfig, autocast

    tolerance = check_tolerance(tolerance)
    formats = parse_candidates(candidates)
    cfg = cfg or TrainConfig()
    train, dev = dev_split(tokens, dev_fraction, cfg.seq, window)
    score = lambda model: evaluate_on(model, base, dev, window, max_tokens)  # noqa: E731
    with autocast(dtype, base.device):
        base_dev = score(base.model)
    rows, files, trained = [], {}, {}
    with tempfile.TemporaryDirectory() as d:
        for f in formats:
            rec = recipe_lr(f.method, base.name, recipe) if lr is None else given_lr(lr)
            if f.trained not in trained:
                c = dataclasses.replace(cfg, lr=rec.lr)
                adapted = personalise(base, train.to(base.device), f.method, c, label=f"train {f.name}",
                                      method_config=f.config, dtype=dtype)
                path = save_adapted(adapted, Path(d) / f"{len(trained)}.safetensors", base, info=info)
                trained[f.trained] = (path.read_bytes(), adapted.result)
                del adapted
            raw, result = trained[f.trained]
            data = raw if f.spec == RAW else encode_adapter(base, load_adapted(base, data=raw, source=f.name), f.spec)
            loaded = load_adapted(base, data=data, source=f"candidate {f.name}")
            with autocast(dtype, base.device):
                r = score(loaded.model)
            files[f.name] = data
            rows.append({"format": f.name, "method": f.method, "scheme": wire.parse_file(data, f.name)[1]["scheme"],
                         "params": loaded.n_params, "bytes": len(data), "dev_ppl": r["ppl"], **rec.to_json(),
                         "steps": result.steps, "train_s": round(result.wall_s, 2)})
    verdict = judge([(r["format"], r["bytes"], r["dev_ppl"]) for r in rows], base_dev["ppl"], tolerance)
    by_name = {v["name"]: v for v in verdict["rows"]}
    table_rows = []
    for r in sorted(rows, key=lambda r: [v["name"] for v in verdict["rows"]].index(r["format"])):
        v = by_name[r["format"]]
        table_rows.append({**r, "dev_ppl_vs_best": v["ppl_vs_best"], "within_tolerance": v["within_tolerance"],
                           "beats_base": v["beats_base"], "accepted": v["accepted"]})
    table = {"chosen": verdict["chosen"], "rule": rule_text(tolerance), "tolerance": tolerance,
             "dev_fraction": dev_fraction, "dev_tokens": base_dev["tokens"], "train_tokens": int(len(train)),
             "window": window, "base_dev_ppl": base_dev["ppl"], "best_dev_ppl": verdict["best_ppl"],
             "candidates": table_rows}
    table = json_safe(table)
    if verdict["chosen"] is None:
        return Choice(table, None, None)
    data = with_choice(files[verdict["chosen"]], table)
    return Choice(table, data, load_adapted(base, data=data, source=f"chosen {verdict['chosen']}"))


def with_choice(data: bytes, table: dict) -> bytes:
    """An adapter file's bytes with `table` recorded as its `choice` metadata (tensors untouched)."""
    from . import wire

    tensors, meta = wire.parse_file(data, "candidate")
    return wire.adapter_bytes(dict(tensors), {**meta, "choice": json_safe(table)})


def json_safe(x):
    """Non-finite floats -> None (the adapter parser refuses NaN and Infinity in metadata)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _num(x, fmt: str, width: int) -> str:
    return format(x, fmt).rjust(width) if isinstance(x, (int, float)) else "-".rjust(width)


def render_table(table: dict) -> str:
    lines = [f"{'format':24s} {'params':>10s} {'bytes':>11s} {'dev ppl':>9s} {'vs best':>8s}  verdict",
             f"{'base (no adapter)':24s} {0:10,d} {0:11,d} {_num(table['base_dev_ppl'], '.3f', 9)}"]
    for r in table["candidates"]:
        why = ("SHIP" if r["format"] == table["chosen"] else "ok" if r["accepted"] else "refused: " + ", ".join(
            w for w, bad in ((f"> {100 * table['tolerance']:g} % over the best", not r["within_tolerance"]),
                             ("not better than the base", not r["beats_base"])) if bad))
        lines.append(f"{r['format']:24s} {r['params']:10,d} {r['bytes']:11,d} {_num(r['dev_ppl'], '.3f', 9)} "
                     f"{_num(r['dev_ppl_vs_best'], '.4f', 8)}  {why}")
    lines.append(f"rule: {table['rule']}; dev slice: the training pool's last {100 * table['dev_fraction']:g} % "
                 f"({table['dev_tokens']} tokens scored, {table['window']}-token windows)")
    if table["chosen"] is None:
        lines.append("no candidate beats the base on the dev slice: no adapter written (serve this user the bare "
                     "base)")
    return "\n".join(lines)
