"""Resuming `sharedllm quantize` where it stopped: the ternary base file is made in two stages that each leave a
file beside `--out`, so that a stopped or crashed run (a 0.5B base takes 1-2 h on a CPU) loses little of it.

1. The codes (GPTQ, layer by layer): when they are done they are kept in `<out stem>.codes.safetensors` (the
   quantised matrices as the ternary file stores them, exact: codes packed, alpha / mu already float16). A rerun
   with the same source base, method, settings and calibration text takes them from there instead of quantising
   again. A stop during this stage loses this stage's work.
2. The repair pass: a training snapshot (sharedllm.snapshot: norm gains, alpha, mu, AdamW's state, the RNG, the KL
   losses) at `<out stem>.snapshot.safetensors`, written every 5 minutes and on SIGTERM (the run then stops after
   the current step); the rerun resumes from it, to the file an uninterrupted run writes, bit for bit on the same
   CPU kind and torch.

Both files are deleted once the ternary base file is written. Either one that does not match this run (another
base, method, setting or text) or does not check out is ignored and replaced. Never unpickles: safetensors and JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..atomic import write_bytes_atomic
from ..log import say
from ..snapshot import Snapshot, beside, token_digest
from .ternary import read_quantised, tensors_digest

STAGE_KEY = "sharedllm-quantize-codes"


class QuantiseStages:
    """The two resumable stages of one quantise run writing `out`. `key`: what the run is (source base
    fingerprint, method, its settings); the calibration tokens are added to it."""

    def __init__(self, out, key: dict, calib: torch.Tensor | None):
        self.out = Path(out)
        self.key = json.loads(json.dumps({**key, "calib": None if calib is None else token_digest(calib)}))
        self.codes_path = self.out.with_suffix(".codes.safetensors")
        self.snapshot_path = beside(self.out)
        self._codes_digest = None  # the kept codes' payload digest, once kept or read: what the repair is bound to

    def _codes_key(self) -> dict:
        """The codes do not depend on the repair pass's settings."""
        params = {k: v for k, v in self.key.get("params", {}).items() if not k.startswith("repair_")}
        return {**self.key, "params": params}

    def kept_codes(self, model) -> dict | None:
        """The quantised matrices a previous run of this quantise kept, checked against `model`; None if none."""
        if not self.codes_path.is_file():
            return None
        try:
            q = self._read_codes(model)
        except Exception as e:  # noqa: BLE001 - unusable codes mean: quantise again
            say(f"ignoring kept codes {self.codes_path} ({e}); quantising again")
            return None
        say(f"taking the quantised matrices from {self.codes_path} (kept by an earlier run); not quantising again")
        return q

    def _read_codes(self, model) -> dict:
        with safe_open(str(self.codes_path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(STAGE_KEY, "null"))
        if not isinstance(meta, dict) or meta.get("key") != self._codes_key():
            raise ValueError("they were kept for another run")
        kinds, tensors = meta.get("kinds"), load_file(str(self.codes_path))
        if not isinstance(kinds, dict) or tensors_digest(tensors) != meta.get("payload_sha256"):
            raise ValueError("their tensors do not match their metadata")
        self._codes_digest = meta["payload_sha256"]
        q = {}
        for mod, kind in kinds.items():
            weight = model.get_submodule(mod).weight
            q[mod] = read_quantised(tensors, mod, kind, tuple(weight.shape), str(self.codes_path))
            if q[mod].dequant().shape != weight.shape:  # dequant also checks alpha / scale against the codes
                raise ValueError(f"matrix {mod} is not {tuple(weight.shape)}")
        return q

    def keep_codes(self, q: dict) -> None:
        """Keep the quantised matrices (temp file, fsync, rename) for a rerun after a stop."""
        from safetensors.torch import save

        tensors = {k: v.contiguous() for mod, t in q.items() for k, v in t.to_file(mod).items()}
        kinds = {mod: t.kind for mod, t in q.items()}
        self._codes_digest = tensors_digest(tensors)
        meta = {"key": self._codes_key(), "kinds": kinds, "payload_sha256": self._codes_digest}
        write_bytes_atomic(self.codes_path, save(tensors, metadata={STAGE_KEY: json.dumps(meta)}))

    def repair_snapshot(self) -> Snapshot:
        """The repair pass's training snapshot, bound to this run and to the exact codes kept (or read) before it."""
        return Snapshot(self.snapshot_path, {**self.key, "stage": "repair", "codes": self._codes_digest})

    def clear(self) -> None:
        self.codes_path.unlink(missing_ok=True)
        self.snapshot_path.unlink(missing_ok=True)
