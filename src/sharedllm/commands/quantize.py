"""sharedllm quantize: write a ternary base file (decoder linears as packed ternary codes + scales)."""
from __future__ import annotations

import torch

from ..quant.make import DEFAULT_METHOD, REPAIR_STEPS, ternarise
from ..quant.ptq import METHODS, PTQConfig
from .args import add_base_args

HELP = ("ternarise a base's decoder linears into one file (5 trits/byte + scales); use it with --base FILE. "
        "Stopped part-way (kill PID), the same command resumes")


def configure(p) -> None:
    p.add_argument("--out", required=True, help="ternary base file to write (.safetensors)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help="absmean (naive baseline) | asym (per-row alpha*T+mu, no data) | gptq-asym (calibrated)")
    p.add_argument("--calib", default=None,
                   help="general text for calibration and repair; only its first 80 %% is used")
    d = PTQConfig()
    p.add_argument("--group", type=int, default=d.group, help="columns per scale group (0 = whole row)")
    p.add_argument("--calib-seqs", type=int, default=d.calib_seqs)
    p.add_argument("--calib-len", type=int, default=d.calib_len)
    p.add_argument("--damp", type=float, default=d.damp)
    p.add_argument("--rounds", type=int, default=d.rounds, help="GPTQ rounding + refit passes per matrix")
    p.add_argument("--target-bpw", type=float, default=d.target_bpw,
                   help="bits/weight budget for keeping damaged matrices as int8 (0 = all ternary)")
    p.add_argument("--keep-err", type=float, default=d.keep_err,
                   help="relative output error above which a matrix is kept as int8 (within the budget)")
    p.add_argument("--repair-steps", type=int, default=REPAIR_STEPS,
                   help="distillation steps re-tuning norm gains and scales on the calibration text (default "
                        f"{REPAIR_STEPS}: the best setting within 30 CPU-minutes on the default base; 0 = none)")
    p.add_argument("--repair-lr", type=float, default=d.repair_lr)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    add_base_args(p)


def ptq_config(args) -> PTQConfig:
    return PTQConfig(group=args.group, calib_seqs=args.calib_seqs, calib_len=args.calib_len, damp=args.damp,
                     rounds=args.rounds, target_bpw=args.target_bpw, keep_err=args.keep_err,
                     repair_steps=args.repair_steps, repair_lr=args.repair_lr)


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    return ternarise(args.base, args.out, args.method, args.calib, ptq_config(args), args.device)


def render(r: dict) -> str:
    return "\n".join([
        f"ternary base  {r['out']}  ({r['method']}, {r['bytes']:,} bytes, fingerprint {r['fingerprint'][:16]}...)",
        f"decoder linears: {r['bits_per_weight']:.4f} bits/weight incl. scales ({r['bytes_decoder_linears']:,} bytes;"
        f" {len(r['kept_int8'])} matrices kept as int8)",
        f"stored apart: embeddings fp16 {r['bytes_embeddings_fp16']:,} bytes, norms/biases fp32 "
        f"{r['bytes_norms_biases_fp32']:,} bytes, tokenizer {r['bytes_tokenizer']:,} bytes",
        f"quantised in {r['wall_s']:.1f} s from base {r['source_fingerprint'][:16]}..."])
