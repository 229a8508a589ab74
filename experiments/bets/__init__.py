"""The catalogue's bets, loaded by path by the runtime in `sharedllm.bets` (`sharedllm bet`, `--bets-dir`).

BETS lists them in report order, PLOTS the modules whose `plots` hooks come first in REPORT.md's plots; CORPORA, OUT
and README are this checkout's defaults (see sharedllm.bets.catalogue).
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPORA = REPO / "data" / "corpora"
OUT = REPO / "out"
README = REPO / "README.md"
BETS = {  # bet id -> module in this folder
    "13": "13_ternary_ptq", "37": "37_norm_only", "46": "46_replication", "49": "49_adapter_shootout",
    "52": "52_quant_plus_adapter", "53": "53_adapter_compress", "54": "54_adapter_averaging",
    "55": "55_logit_ensemble", "58": "58_steering_vector", "60": "60_noise_floor", "61": "61_confusion_matrix",
    "63": "63_noise_robustness", "scale_protocol": "scale_protocol", "lr_sensitivity": "lr_sensitivity",
    "chat_cohort": "chat_cohort", "chat_scale": "chat_scale", "adapter_frontier": "adapter_frontier",
    "adapter_frontier_wide": "adapter_frontier_wide", "adapter_frontier_screen": "adapter_frontier_screen",
}
PLOTS = ["61_confusion_matrix", "49_adapter_shootout", "scale_protocol", "lr_sensitivity"]  # REPORT.md's plot order
