"""The Python API: ``preftune.dpo``, ``preftune.sft`` and ``preftune.reward`` run the CLI's own recipes from a
script or a notebook, with the objects a user already holds.

    import preftune
    result = preftune.dpo(model="smollm2-135m", train_data=rows, dpo={"beta": 0.1}, train={"max_steps": 100})
    result.run_dir, result.train["loss"], result.model   # the trained policy, loaded from result.run_dir

- ``model=`` / ``ref_model=``: a spec string (an alias, a directory, a .gguf file, a hub id) or an in-memory
  ``transformers`` model (then ``tokenizer=`` too). An in-memory model is saved into ``RUN/inputs/`` as
  safetensors and trained from there, so checkpoints, ``--resume``, model cards and the precomputed-reference
  cache (keyed on the saved weights' content) work as for any other model.
- ``train_data=`` / ``eval_data=``: a path, a list of dicts or a ``datasets.Dataset``; records in memory are
  written to ``RUN/inputs/{train,eval}.jsonl`` and read back by the same validating reader as a file.
- ``config=`` a YAML path, ``overrides=`` the CLI's own ``key=value`` strings, and each config section as a dict
  keyword (``train={"max_steps": 10}``); all validated the same strict way as on the command line.
- ``resume=RUN_DIR`` continues a run under the CLI's ``--resume`` rule.

``preftune.export(model, "policy.gguf", type="f16")`` writes a trained policy for llama.cpp (``preftune export``).

The same run directory, metrics, checkpoints and model card as the CLI; the return value is a :class:`Result`.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMMANDS = ("dpo", "sft", "reward")


@dataclass
class Result:
    """A finished run: its directory, last step, final train and eval metrics; the trained model on demand."""

    command: str
    run_dir: Path
    step: int
    train: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # the recipe's whole summary

    @property
    def model(self):
        """The trained policy (``RUN/policy``), or the reward model (``RUN/reward_model``) of ``preftune.reward``."""
        if self.command == "reward":
            from preftune.models.reward_model import RewardModel

            return RewardModel.load(self.run_dir / "reward_model")
        from preftune.models.load import load_causal_lm

        return load_causal_lm(str(self.run_dir / "policy"))

    @property
    def tokenizer(self):
        from preftune.models.load import load_tokenizer

        return load_tokenizer(str(self.run_dir / ("reward_model" if self.command == "reward" else "policy")))


def load_config(command: str = "dpo", config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **sections: dict[str, Any]):
    """``command``'s config: defaults <- ``config`` (YAML) <- ``overrides`` <- ``sections`` (dicts per section),
    strictly checked as on the command line."""
    from preftune.config import load_config as load

    return load(config, [*overrides, *_section_overrides(sections)], base=_recipe(command).CONFIG())


def dpo(model=None, **kwargs) -> Result:
    """Train a policy with DPO (or a loss of its family); see the module docstring for the arguments."""
    return _train("dpo", model, **kwargs)


def sft(model=None, **kwargs) -> Result:
    """Supervised fine-tuning (makes a reference for DPO); see the module docstring for the arguments."""
    return _train("sft", model, **kwargs)


def reward(model=None, **kwargs) -> Result:
    """Train a Bradley-Terry reward model; see the module docstring for the arguments."""
    return _train("reward", model, **kwargs)


def export(model, gguf: str | Path, *, tokenizer=None, type: str = "f16", tokenizer_pre: str | None = None) -> dict:
    """Write ``model`` (a spec string such as ``result.run_dir / "policy"``, or an in-memory Llama-family
    ``transformers`` model with its ``tokenizer=``) as a GGUF file for llama.cpp; returns the CLI's summary."""
    from preftune.errors import ConfigError
    from preftune.models.gguf_export import export_gguf
    from preftune.recipes.export import load_exportable

    if isinstance(model, (str, Path)):
        model, tokenizer = load_exportable(str(model))
    elif tokenizer is None:
        raise ConfigError("model= is an in-memory model: pass its tokenizer= too")
    return export_gguf(model, tokenizer, Path(gguf), kind=type, name=Path(str(gguf)).stem,
                       tokenizer_pre=tokenizer_pre)


def _recipe(command: str):
    from preftune.errors import ConfigError

    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}: the API trains with {', '.join(COMMANDS)}")
    return importlib.import_module(f"preftune.recipes.{command}")


def _section_overrides(sections: dict[str, Any]) -> list[str]:
    """``train={"max_steps": 10}`` -> ``["train.max_steps=10"]`` (values as YAML scalars, as typed on the CLI)."""
    from preftune.errors import ConfigError

    out = []
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}= must be a dict of that section's keys, got {type(values).__name__} "
                              f"(a top-level key such as model= is an argument of its own)")
        for key, value in values.items():
            out.append(f"{section}.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def _train(command: str, model=None, *, train_data=None, eval_data=None, ref_model=None, tokenizer=None,
           config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), resume: str | Path | None = None,
           **sections: dict[str, Any]) -> Result:
    from preftune.cli import route_deepspeed_logs
    from preftune.recipes.common import load_run_config

    route_deepspeed_logs()  # DeepSpeed (imported by transformers when installed) logs to stdout otherwise
    recipe = _recipe(command)
    if resume is not None:
        if config is not None or model is not None or train_data is not None or eval_data is not None:
            from preftune.errors import ConfigError

            raise ConfigError("resume= continues a run with its saved config and inputs: pass overrides only")
        cfg = load_run_config([*overrides, *_section_overrides(sections)], str(resume), recipe.CONFIG)
    else:
        cfg = load_run_config([*([str(config)] if config else []), *overrides, *_section_overrides(sections)], None,
                              recipe.CONFIG)
        cfg.run.dir = cfg.run.dir or str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")
        inputs = Path(cfg.run.dir) / "inputs"
        for name, value in (("model", model), ("ref_model", ref_model)):
            if value is not None and hasattr(cfg, name):
                setattr(cfg, name, _model_spec(value, tokenizer, inputs / name, name))
        for name, value in (("train", train_data), ("eval", eval_data)):
            if value is not None:
                setattr(cfg.data, name, _data_path(value, inputs / f"{name}.jsonl", f"{name}_data"))
    out = recipe.run(cfg, resume=resume is not None)
    return Result(command=command, run_dir=Path(out["run_dir"]), step=int(out.get("step", 0)),
                  train=dict(out.get("train") or {}), eval=dict(out.get("eval") or {}), details=out)


def _model_spec(value, tokenizer, where: Path, name: str) -> str:
    """A spec string as it is; an in-memory model saved (safetensors, with its tokenizer) into ``where``."""
    from preftune.errors import ConfigError

    if isinstance(value, (str, Path)):
        return str(value)
    if not hasattr(value, "save_pretrained"):
        raise ConfigError(f"{name}= takes a model spec string or a transformers model, got {type(value).__name__}")
    if tokenizer is None:
        raise ConfigError(f"{name}= is an in-memory model: pass its tokenizer= too")
    where.mkdir(parents=True, exist_ok=True)
    value.save_pretrained(where, safe_serialization=True)
    tokenizer.save_pretrained(where)
    return str(where)


def _data_path(value, where: Path, name: str) -> str:
    """A path as it is; records in memory (a list of dicts, a ``datasets.Dataset``) written to ``where``."""
    from preftune.data.records import write_jsonl
    from preftune.errors import ConfigError

    if isinstance(value, (str, Path)):
        return str(value)
    if hasattr(value, "to_list"):  # datasets.Dataset
        value = value.to_list()
    if not isinstance(value, list):
        raise ConfigError(f"{name}= takes a path, a list of dicts or a datasets.Dataset, got {type(value).__name__}")
    where.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(where, value)
    return str(where)
