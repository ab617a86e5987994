"""`preftune inspect`: the data as a run will see it, tokenised by the run's own rules, without model weights."""

import json

import pytest

from preftune.cli import main

from conftest import write_jsonl

ROWS = [
    {"prompt": "The movie was", "chosen": " wonderful.", "rejected": " dull."},
    {"prompt": [{"role": "user", "content": "Hi there"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"},  # over max_prompt_tokens: keeps its end
    {"prompt": "Same", "chosen": " twice", "rejected": " twice"},  # identical: refused by the reader, skipped
    # a shared start longer than the response budget: truncation makes chosen == rejected
    {"prompt": "Long", "chosen": " a b c d e f g h i j k l m n o p q r s t good", "rejected":
        " a b c d e f g h i j k l m n o p q r s t bad"},
    {"prompt": "Broken", "chosen": " only chosen"},  # rejected missing: skipped
]


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", ROWS)


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: inspect reads the tokenizer only."""
    import preftune.models.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded model weights")

    monkeypatch.setattr(load, "load_causal_lm", refuse)


def test_inspect_reports_the_file_and_shows_items_token_by_token(data, capsys, no_weights):
    args = ["inspect", "model=tiny", f"data.train={data}", "data.max_prompt_tokens=16", "data.max_length=20"]
    assert main([*args, "--n", "3"]) == 0
    text = capsys.readouterr().out
    assert f"== train: {data}: 6 records -> 4 items" in text
    assert "skipped 2: 1 x chosen identical to rejected, 1 x missing field 'rejected'" in text
    assert f"a run with data.on_invalid=error stops at the first: {data}:4: field 'chosen'" in text
    # the conversation's prompt (SmolLM2's template adds a system turn) and the 41-token one keep their last 16
    assert "truncated: 2 prompts kept their last tokens, 2 responses cut" in text
    assert f"chosen == rejected (became): 1, first {data}:5 (no training signal: a run stops there" in text
    # the prompt (masked) and each response (trained) with its special tokens: the boundary and EOS visible
    assert "  prompt       3 tokens (masked) |The movie was|" in text
    assert "  chosen       3 tokens (trained; ends with EOS) | wonderful.<|im_end|>|" in text
    assert "(conversation)" in text and "<|im_start|>user\\nHi there<|im_end|>" in text
    assert "tokens (masked, cut from 41)" in text  # the long prompt: kept its last 16 tokens


def test_a_run_stops_at_or_skips_a_pair_that_truncation_made_identical(tmp_path, capsys, caplog):
    """What inspect warns of, a run does: the pair is a located error, or skipped and counted (it would train on
    nothing and still count in the loss mean and the accuracy)."""
    rows = [ROWS[0], {"prompt": "Tell me a story.", "chosen": " Once upon a time a brave knight rode out and won.",
                      "rejected": " Once upon a time a brave knight rode out and lost."}]
    path = write_jsonl(tmp_path / "cut.jsonl", rows)
    args = ["dpo", "model=tiny", f"data.train={path}", "data.max_length=12", "train.max_steps=1",
            "train.precision=fp32", "train.progress=false"]
    assert main([*args, f"run.dir={tmp_path / 'a'}"]) == 2
    assert (f"{path}:2: field 'rejected': identical to chosen once tokenised and cut to data.max_length=12 (no "
            "training signal) (raise data.max_length, or data.on_invalid=skip") in capsys.readouterr().err
    assert main([*args, "data.on_invalid=skip", f"run.dir={tmp_path / 'b'}"]) == 0
    assert "skipped 1 of 2 records: 1 × chosen and rejected tokens identical after truncation" in caplog.text


def test_inspect_json_and_the_config_command(tmp_path, data, capsys, no_weights):
    config = tmp_path / "sft.yaml"
    config.write_text(f"command: sft\nmodel: tiny\ndata:\n  train: {data}\n", encoding="utf-8")
    assert main(["inspect", str(config), "--json", "--n", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["command"] == "sft" and report["tokenizer"]["eos"] == "<|im_end|>"
    (f,) = report["files"]
    assert set(f["lengths"]) == {"prompt", "completion"} and f["items"] == 4  # SFT reads a pair as its chosen response
    part = f["shown"][0]["parts"]["completion"]
    assert part["trained"] and part["ends_with_eos"] and part["text"] == " wonderful.<|im_end|>"
    assert main(["inspect", "model=tiny", f"data.train={data}", "--n", "-1"]) == 2
    assert "--n must be >= 0" in capsys.readouterr().err


def test_inspect_a_file_whose_records_are_all_skipped(tmp_path, capsys, no_weights):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " b"}])
    assert main(["inspect", "model=tiny", f"data.train={data}"]) == 0
    out = capsys.readouterr().out
    assert "1 records -> 0 items" in out and "skipped 1: 1 x missing field 'rejected'" in out
