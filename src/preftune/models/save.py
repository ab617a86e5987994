"""Writing models: an HF-format safetensors directory, written atomically, and a run's final policy."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from preftune.models.lora import BASE_FILE, is_peft_model


def save_model(model: torch.nn.Module, tokenizer, path: Path, extra=None, card: str | None = None) -> Path:
    """HF-format safetensors directory (full weights, or a peft adapter), written atomically (temporary
    directory, then rename). ``extra(tmp_dir)`` may add files before the rename; ``card`` is written as its
    README.md (models/card.py)."""
    from preftune.train.rundir import writing

    with writing(path, "model"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            with _without_deepspeed_probe():
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if extra is not None:
                extra(tmp)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _without_deepspeed_probe():
    """``save_pretrained`` unwraps the model through accelerate, which imports DeepSpeed whenever it is installed
    (1-3 s per process, on every save, to check for an engine preftune never hands it: the model saved here is
    always a plain module). While DeepSpeed is not imported yet, the probe is told it is absent."""
    import contextlib
    import sys
    from unittest import mock

    if "deepspeed" in sys.modules:
        return contextlib.nullcontext()
    try:
        import accelerate.utils.other as other
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(other, "is_deepspeed_available"):
        return contextlib.nullcontext()
    return mock.patch.object(other, "is_deepspeed_available", lambda: False)


def save_policy(cfg, policy: torch.nn.Module, tokenizer, run_dir: Path) -> None:
    """``RUN/policy``: full weights, or the LoRA adapter (+ ``RUN/policy-merged`` when lora.export_merged), each
    with its model card. An adapter directory records its base model spec so ``load_causal_lm`` can rebuild it
    offline."""
    from preftune.models.card import model_card

    if not is_peft_model(policy):
        save_model(policy, tokenizer, run_dir / "policy", card=model_card(run_dir, "policy"))
        return
    base = json.dumps({"model": cfg.model, "seed": cfg.train.seed})
    save_model(policy, tokenizer, run_dir / "policy", extra=lambda tmp: (tmp / BASE_FILE).write_text(base),
               card=model_card(run_dir, "policy (LoRA adapter)", adapter=True))
    if cfg.lora.export_merged:
        save_model(policy.merge_and_unload(), tokenizer, run_dir / "policy-merged",
                   card=model_card(run_dir, "policy (adapter merged into the base)"))
