"""preftune: align causal language models to human preferences directly (DPO and its family)."""

from preftune.version import __version__  # noqa: F401


def __getattr__(name: str):
    """``preftune.dpo``, ``sft``, ``reward``, ``export``, ``load_config``, ``Result``: the Python API (preftune/api.py), imported
    on first use so that ``import preftune`` (and the CLI's start) stays light."""
    if name in ("dpo", "sft", "reward", "export", "load_config", "Result"):
        from preftune import api

        return getattr(api, name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
