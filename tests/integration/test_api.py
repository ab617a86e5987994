"""The Python API (preftune.dpo / sft / reward): the CLI's recipes with in-memory models and records."""

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

import preftune
from preftune.cli import main
from preftune.errors import ConfigError

from conftest import PAIRS, write_jsonl

STRINGS = [r for r in PAIRS if all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected"))]

FAST = {"train": {"max_steps": 3, "batch_size": 2, "precision": "fp32", "progress": False,
                  "optimizer": "adamw", "lr": 1e-3, "save_every": 2}}
RUN = {"plot": False}


def _weights(run_dir: Path, name: str = "policy") -> dict:
    return load_file(str(run_dir / name / "model.safetensors"))


def test_an_in_memory_model_and_a_dataset_train_as_the_cli_does(tmp_path):
    """preftune.dpo(model=<transformers model>, tokenizer=..., train_data=<datasets.Dataset>) trains the same
    weights as `preftune dpo model=tiny data.train=FILE` (the in-memory model is tiny's own initialisation)."""
    from preftune.models.load import load_causal_lm, load_tokenizer

    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", STRINGS)
    assert len(STRINGS) >= 4
    assert main(["dpo", "model=tiny", f"data.train={pairs_file}", "train.max_steps=3", "train.batch_size=2",
                 "train.precision=fp32", "train.progress=false", "train.optimizer=adamw", "train.lr=1e-3",
                 "train.save_every=2", "run.plot=false", f"run.dir={tmp_path / 'cli'}"]) == 0
    result = preftune.dpo(model=load_causal_lm("tiny", seed=0), tokenizer=load_tokenizer("tiny"),
                          train_data=datasets.Dataset.from_list(STRINGS), run={**RUN, "dir": str(tmp_path / "api")},
                          **FAST)
    assert result.step == 3 and result.run_dir == tmp_path / "api" and result.train["loss"] > 0
    a, b = _weights(tmp_path / "cli"), _weights(tmp_path / "api")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "api" / "inputs" / "model" / "model.safetensors").is_file()
    assert isinstance(result.model, torch.nn.Module) and result.tokenizer.eos_token == "<|im_end|>"
    # resume= continues the run under the CLI's rule (here: further, to step 5)
    more = preftune.dpo(resume=tmp_path / "api", train={"max_steps": 5})
    assert more.step == 5


def test_sft_and_reward_take_lists_of_dicts(tmp_path):
    sft = preftune.sft(model="tiny", train_data=PAIRS, run={**RUN, "dir": str(tmp_path / "sft")}, **FAST)
    assert sft.step == 3 and (tmp_path / "sft" / "inputs" / "train.jsonl").is_file()
    rm = preftune.reward(model="tiny", train_data=PAIRS, eval_data=PAIRS[:2],
                         run={**RUN, "dir": str(tmp_path / "rm")}, **FAST)
    assert 0.0 <= rm.eval["eval/accuracy"] <= 1.0
    assert rm.model.head.weight.shape[0] == 1


def test_precomputed_reference_log_probs_are_keyed_on_an_in_memory_models_weights(tmp_path):
    """Two different in-memory models, the same cache directory: the second computes its own log-probs."""
    from preftune.models.load import load_causal_lm, load_tokenizer

    cache = tmp_path / "cache"
    for seed in (0, 1):
        preftune.dpo(model=load_causal_lm("tiny", seed=seed), tokenizer=load_tokenizer("tiny"), train_data=PAIRS,
                     reference={"mode": "precomputed", "cache_dir": str(cache)},
                     run={**RUN, "dir": str(tmp_path / f"run{seed}")}, **FAST)
    assert len(list(cache.glob("*.safetensors"))) == 2


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="unknown config key|no such|train.nope"):
        preftune.dpo(model="tiny", train_data=PAIRS, train={"nope": 1})
    with pytest.raises(ConfigError, match="pass its tokenizer= too"):
        preftune.dpo(model=torch.nn.Linear(2, 2).__class__.__new__(type("M", (), {"save_pretrained": 1})),
                     train_data=PAIRS)
    with pytest.raises(ConfigError, match="must be a dict"):
        preftune.dpo(model="tiny", train_data=PAIRS, train=3)
    cfg = preftune.load_config("sft", overrides=["train.lr=1e-4"], train={"max_steps": 7})
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-4, 7)


def test_the_example_script_runs(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "python_api.py"
    done = subprocess.run([sys.executable, str(example), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DPO loss" in done.stdout and (tmp_path / "out" / "dpo" / "policy" / "README.md").is_file()
