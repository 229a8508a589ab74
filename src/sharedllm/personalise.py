"""The library's main verbs: train an adapter for a user, save it, load it back onto a base, score text."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import wire
from .adapters import adapted_model, adapter_state, config_to_json, get_method, load_state
from .arch import Base
from .data import eval_windows
from .metrics import evaluate
from .snapshot import NO_SNAPSHOT
from .train import TrainConfig, TrainResult, autocast, dtype_meta, train


@dataclass
class Adapted:
    """A private copy of the base with one trained (or loaded) adapter attached."""

    model: torch.nn.Module
    params: dict
    method: str
    meta: dict | None = None
    result: TrainResult | None = None
    config: object = None  # the method's frozen config (LoRA rank, ...); recorded in the file as method_config

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def new_adapter(base: Base, method: str, seed: int | None = None, config=None) -> Adapted:
    """A fresh adapter on a private copy of the base. With `seed`, its initial values (e.g. LoRA's random A)
    depend on the seed alone, not on what the process ran before; the global RNG is left as it was. `config`:
    the method's config (its dataclass or a JSON dict); None = the method's default."""
    impl = get_method(method, config)
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model, params = adapted_model(base.model, impl)
    return Adapted(model=model, params=params, method=method, config=impl.config)


def personalise(base: Base, train_tokens: torch.Tensor, method: str = "norm", cfg: TrainConfig | None = None,
                label: str | None = None, method_config=None, dtype: str = "fp32", snapshot=NO_SNAPSHOT) -> Adapted:
    """Train one adapter on `train_tokens`. `dtype` is the compute dtype (sharedllm.train.autocast: bf16 = matmuls
    under bf16 autocast, parameters and optimizer state fp32); other than fp32 it is recorded in the metadata.
    `snapshot`: a sharedllm.snapshot.Snapshot to resume from and keep up to date (see `sharedllm.train.train`)."""
    cfg = cfg or TrainConfig()
    adapted = new_adapter(base, method, seed=cfg.seed, config=method_config)
    with autocast(dtype, base.device):
        adapted.result = train(adapted.model, adapted.params, train_tokens, cfg, label=label or f"train {method}",
                                snapshot=snapshot)
    adapted.meta = train_meta(cfg, adapted.result, dtype)
    return adapted


def train_meta(cfg: TrainConfig, result: TrainResult, dtype: str = "fp32") -> dict:
    """The metadata a trained adapter carries: its training config (plus `dtype` when not fp32), the loss summary,
    and `compute_dtype` when not fp32 (the bets' record; fp32 files are as they always were)."""
    train_record = {**cfg.to_json(), **({} if dtype == "fp32" else {"dtype": dtype})}
    return {"train": train_record, "loss": result.summary(), **dtype_meta(dtype)}


def save_adapted(adapted: Adapted, path, base: Base, dtype=torch.float16, info: dict | None = None) -> Path:
    config = adapted.config if adapted.config is not None else get_method(adapted.method).config
    return wire.save_adapter(path, adapter_state(adapted.params), adapted.method, base.fingerprint,
                             {**(adapted.meta or {}), "method_config": config_to_json(config), **(info or {})},
                             dtype=dtype)


def load_adapted(base: Base, path=None, data: bytes | None = None, source: str | None = None,
                 shared_dirs=()) -> Adapted:
    """Load an adapter file (or its bytes) onto `base`, refusing wrong bases, layouts and values. A joint core file
    (`compress --joint`) loads as its materialised LoRA, its shared bases found by sha256 in the file's own folder
    or in `shared_dirs` (quant/joint_files.py); a per-user part trained on top of a group adapter (`adapt --on-top`)
    loads on the base with that group merged in, the group found the same way (sharedllm.stack)."""
    from . import stack
    from .quant import joint_files

    source = source or str(path)
    tensors, meta = wire.parse_file(data, source) if data is not None else wire.read_file(path)
    dirs = ([Path(path).parent] if path is not None else []) + [Path(d) for d in shared_dirs]
    if stack.ON_TOP in meta:  # a per-user part of a hierarchical adapter: on the base with its group merged in
        base = stacked_base(base, stack.find_group(meta, dirs, source), f"{source}: its group adapter")
    wire.check_binding(meta, base.fingerprint, source)
    adapted = new_adapter(base, meta.get("method", "?"), config=meta.get("method_config"))
    base_state = dict(base.model.named_parameters())
    named = joint_files.decode(tensors, meta, wire.layout_of(adapted.params), base_state, source, dirs,
                              base.fingerprint)
    load_state(adapted.params, named, source)
    adapted.meta = meta
    return adapted


def stacked_base(base: Base, group_data: bytes, source: str) -> Base:
    """A private copy of `base` with a group LoRA (file bytes, bound to `base`) merged into its weights,
    fingerprinted as sharedllm.stack.stacked_fingerprint: what a hierarchical adapter's per-user part trains on."""
    import copy

    from . import stack
    from .arch import freeze

    stack.group_method(wire.header_meta(wire.read_header(group_data, source), source) or {}, source)
    private = Base(model=copy.deepcopy(base.model), tokenizer=base.tokenizer, fingerprint=base.fingerprint,
                   name=base.name, meta=dict(base.meta))
    group = load_adapted(private, data=group_data, source=source)  # the full parse and the binding to `base`
    sha = stack.sha256_of(group_data)
    return Base(model=freeze(group.model.merge_and_unload()), tokenizer=base.tokenizer,
                fingerprint=stack.stacked_fingerprint(base.fingerprint, sha), name=base.name,
                meta={**base.meta, stack.ON_TOP: {"sha256": sha, "method": group.method}})


def evaluate_on(model, base: Base, tokens: torch.Tensor, window: int = 256, max_tokens: int | None = None) -> dict:
    return evaluate(model, base.tokenizer, eval_windows(tokens, window, max_tokens))
