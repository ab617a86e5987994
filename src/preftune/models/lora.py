"""LoRA through peft: wrap a policy, save the adapter (and optionally the merged model), load it back.

An adapter directory written by preftune carries ``preftune_base.json`` naming the base model spec (alias,
directory or .gguf, and the seed for ``tiny``), so ``load_causal_lm(ADAPTER_DIR)`` can rebuild base + adapter
without a hub. Loading an adapter for inference or for further training MERGES it into the base weights: a new
adapter trained on top then has the merged SFT model as its "adapter disabled" reference, which is exactly the
reference DPO needs when continuing from an SFT LoRA adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from preftune.config import LoRAConfig

BASE_FILE = "preftune_base.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, seed: int = 0) -> torch.nn.Module:
    """A peft model whose only trainable parameters are the LoRA matrices (B = 0 at init: policy == base).
    The random A matrices are drawn from a generator seeded by ``seed``, so a run is reproducible."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
        [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def base_of(adapter_dir: str | Path) -> tuple[str, int]:
    """(base model spec, seed) of an adapter directory."""
    path = Path(adapter_dir)
    if (path / BASE_FILE).is_file():
        info = json.loads((path / BASE_FILE).read_text(encoding="utf-8"))
        return info["model"], int(info.get("seed", 0))
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    return config["base_model_name_or_path"], 0


def merge_adapter(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():  # peft would unpickle adapter_model.bin
        from preftune.errors import ModelSpecError

        raise ModelSpecError(f"{adapter_dir}: no adapter_model.safetensors, and preftune never unpickles .bin files")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
