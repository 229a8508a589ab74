"""Quantisation: the ternary base file (ternary.py), ternary PTQ methods (ptq.py, gptq.py, repair.py),
int8 and int4 group-wise adapter schemes (adapter_int8.py, adapter_int4.py), LoRA rank truncation (lora_rank.py),
re-encoding (compress.py) and the per-user compression policy (policy.py)."""
