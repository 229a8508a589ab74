"""sharedllm: one frozen base LM, a tiny per-user adapter each, routed never averaged."""

__version__ = "0.1.0"
