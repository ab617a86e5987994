"""Model cards: every saved model directory carries a README.md in the Hugging Face format, built from its run
directory (config, RUN/data.json, metrics), whose config block reproduces the run."""

import hashlib
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from preftune.cli import main
from preftune.models.card import _base_model
from preftune.train.rundir import read_metrics

from conftest import PAIRS, write_jsonl

FAST = ["model=tiny", "train.max_steps=2", "train.batch_size=2", "train.progress=false", "run.plot=false",
        "train.precision=fp32"]


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_dpo_policy_card_reports_the_run_and_reproduces_it(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [*PAIRS, {"prompt": "Broken", "chosen": " no rejected"}])
    assert main(["dpo", *FAST, f"data.train={data}", "data.on_invalid=skip", "data.eval_fraction=0.25",
                 f"run.dir={tmp_path / 'run'}"]) == 0
    card = (tmp_path / "run" / "policy" / "README.md").read_text(encoding="utf-8")
    assert _front(card) == {"library_name": "preftune", "tags": ["preftune", "dpo"]}  # tiny: no hub base model
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert (f"- train: `pairs.jsonl` (sha256 `{digest}`): 9 records, 8 items, 1 skipped (1 x missing field "
            "'rejected'); 0 prompts and 0 responses truncated") in card
    assert "- trained on 6 items, evaluated on 2 (held out of train)" in card
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert f"| train (step 2) | loss {last['loss']:.4g}, rewards/accuracies" in card
    assert "loss `sigmoid` with β=0.1" in card
    # the card's config block, run again, trains the same policy
    (tmp_path / "config.yaml").write_text(re.search(r"```yaml\n(.*?)```", card, re.S).group(1), encoding="utf-8")
    assert main(["dpo", str(tmp_path / "config.yaml"), f"run.dir={tmp_path / 'again'}"]) == 0
    a, b = (load_file(str(tmp_path / run / "policy" / "model.safetensors")) for run in ("run", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("command, extra, cards", [
    ("reward", [], {"reward_model": ["preftune", "reward-model"]}),
    ("dpo", ["lora.enabled=true", "dpo.loss=ipo"], {"policy": ["preftune", "dpo", "ipo", "lora"],
                                                    "policy-merged": ["preftune", "dpo", "ipo"]}),
])
def test_reward_model_and_adapter_cards(tmp_path, pairs_file, command, extra, cards):
    assert main([command, *FAST, f"data.train={pairs_file}", *extra, f"run.dir={tmp_path / 'run'}"]) == 0
    for directory, tags in cards.items():
        card = (tmp_path / "run" / directory / "README.md").read_text(encoding="utf-8")  # peft's own card replaced
        assert _front(card)["tags"] == tags and _front(card)["library_name"] == "preftune"
        assert f"```yaml\ncommand: {command}\n" in card


def test_the_base_model_is_named_only_for_hub_models(tmp_path):
    assert _base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _base_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert _base_model("tiny") is None and _base_model(str(tmp_path)) is None and _base_model("x.gguf") is None
