"""preftune: align causal language models to human preferences directly (DPO and its family)."""

__version__ = "0.1.0"
