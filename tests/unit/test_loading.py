"""Model loading never unpickles: weights come from safetensors, and .bin-only checkpoints are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file


def test_a_bin_only_model_is_refused_with_a_way_out(tmp_path):
    from preftune.models.load import ModelSpecError, load_causal_lm

    load_causal_lm("tiny", seed=0).save_pretrained(tmp_path)
    torch.save(load_file(str(tmp_path / "model.safetensors")), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelSpecError, match="no safetensors weights.*never unpickles.*convert them once"):
        load_causal_lm(str(tmp_path))


def test_a_bin_only_adapter_is_refused(tmp_path):
    from preftune.models.load import ModelSpecError, load_causal_lm
    from preftune.models.lora import BASE_FILE

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / BASE_FILE).write_text(json.dumps({"model": "tiny", "seed": 0}))
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(ModelSpecError, match="no adapter_model.safetensors"):
        load_causal_lm(str(tmp_path))
