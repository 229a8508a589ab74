"""Quantisation: the ternary base file (ternary.py), ternary PTQ methods (ptq.py, gptq.py, repair.py),
int8 adapter schemes (adapter_int8.py) and the per-user compression policy (policy.py)."""
