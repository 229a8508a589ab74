"""Making a ternary base file from a base: the verb behind `sharedllm quantize`, also called by the bets."""
from __future__ import annotations

import time
from pathlib import Path

from ..base import load_base
from ..errors import SharedLLMError
from ..log import say
from .calibration import calibration_tokens
from .ptq import NEEDS_CALIB, PTQConfig, quantize_model
from .stages import QuantiseStages
from .ternary import save_ternary_base

DEFAULT_METHOD = "gptq-asym"
REPAIR_STEPS = 100  # the best setting within 30 CPU-minutes on the default base (docs/BENCHMARKS.md)


def ternarise(base_spec: str, out: str | Path, method: str = DEFAULT_METHOD, calib: str | Path | None = None,
              cfg: PTQConfig | None = None, device: str = "cpu") -> dict:
    """Load `base_spec` (a fresh copy: quantising rewrites its weights), quantise its decoder linears with
    `method`, write the ternary base file `out`; returns what was written (sizes, kept matrices, fingerprints).
    A run stopped part-way (SIGTERM during the repair pass, or a crash) resumes when run again (quant/stages.py);
    `quantize_wall_s` then counts only the last run's seconds."""
    cfg = cfg or PTQConfig(repair_steps=REPAIR_STEPS)
    needs = method in NEEDS_CALIB or cfg.repair_steps
    if needs and not calib:
        raise SharedLLMError(f"--method {method} (or --repair-steps) needs --calib TEXT (general text)")
    say(f"loading base {base_spec}")
    base = load_base(base_spec, device)
    calib_tokens = calibration_tokens(calib, base.tokenizer).to(base.device) if needs else None
    stages = QuantiseStages(out, {"source": base.fingerprint, "method": method, "params": cfg.used(method)},
                            calib_tokens)
    t0 = time.time()
    model, q = quantize_model(base.model, method, calib_tokens, cfg, stages)
    wall = time.time() - t0
    info = {"method": method, "params": cfg.used(method), "source_fingerprint": base.fingerprint,
            "source_name": base.name, "quantize_wall_s": round(wall, 1)}
    meta = save_ternary_base(out, model, base.tokenizer, q, info)
    stages.clear()
    return {"out": str(out), "method": method, "bits_per_weight": meta["bits_per_weight"],
            "bytes": meta["bytes"], "bytes_decoder_linears": meta["bytes_decoder_linears"],
            "bytes_embeddings_fp16": meta["bytes_embeddings_fp16"],
            "bytes_norms_biases_fp32": meta["bytes_norms_biases_fp32"], "bytes_tokenizer": meta["bytes_tokenizer"],
            "kept_int8": sorted(n for n, k in meta["kinds"].items() if k != "ternary"),
            "fingerprint": meta["fingerprint"], "source_fingerprint": base.fingerprint, "wall_s": round(wall, 1)}
