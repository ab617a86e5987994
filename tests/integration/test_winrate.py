"""`preftune winrate --quick` end to end on `tiny` with small HH-format data made here, the seeded split by
prompt, and the error for absent data."""

from __future__ import annotations

import json
import logging


from preftune.cli import main

from conftest import write_jsonl

TOPICS = ["bake bread", "fix a bike", "learn chess", "plant tomatoes", "write a poem", "save money", "run faster",
          "sleep better", "paint a wall", "cook rice", "tie a tie", "clean a pan", "fold a shirt", "study math"]


def _hh_rows(n_multi: int = 6) -> list[dict]:
    """Single-turn HH dialogues (two pairs per prompt) and a few multi-turn ones."""
    rows = []
    for k, topic in enumerate(TOPICS):
        prompt = f"\n\nHuman: How do I {topic}?\n\nAssistant:"
        for good, bad in ((f" Here is how to {topic}: start slowly and practise.", " No."),
                          (f" Step one for {topic}: gather what you need.", " I won't help.")):
            rows.append({"chosen": prompt + good, "rejected": prompt + bad})
    for k in range(n_multi):
        prompt = f"\n\nHuman: Hi {k}\n\nAssistant: Hello!\n\nHuman: Tell me a fact about {k}.\n\nAssistant:"
        rows.append({"chosen": prompt + f" {k} is a number.", "rejected": prompt + " Go away."})
    return rows


def test_split_by_prompt_keeps_prompts_apart_and_tests_single_turn_only(tmp_path):
    from preftune.data.records import read_preference_pairs
    from preftune.eval.hh_task import is_single_turn, split_by_prompt

    pairs, _ = read_preference_pairs(write_jsonl(tmp_path / "hh.jsonl", _hh_rows()))
    split = split_by_prompt(pairs, test_prompts=4, judge_val_pairs=5, seed=0)
    test, val, train = {p for p, _ in split.test}, {p.prompt for p in split.judge_val}, {p.prompt for p in split.train}
    assert len(test) == 4 and all(is_single_turn(p) for p in test)
    assert not (test & val) and not (test & train) and not (val & train)
    assert len(split.judge_val) >= 5 and len(split.train) + len(split.judge_val) + 2 * 4 == len(pairs)
    assert all(c.startswith((" Here is how", " Step one")) for _, c in split.test)  # the chosen reply is the opponent
    assert split_by_prompt(pairs, test_prompts=4, judge_val_pairs=5, seed=0).test == split.test  # seeded
    assert split_by_prompt(pairs, test_prompts=4, judge_val_pairs=5, seed=1).test != split.test


def test_winrate_quick_end_to_end_on_tiny(tmp_path, capsys, caplog):
    data = write_jsonl(tmp_path / "hh.jsonl", _hh_rows())
    out = tmp_path / "w"
    args = ["winrate", "--quick", "--out", str(out), "model=tiny", f"winrate.data={data}", "winrate.test_prompts=4",
            "winrate.judge_val_pairs=4", "train.precision=fp32", "train.batch_size=2", "data.max_length=64",
            "data.max_prompt_tokens=32", "winrate.generation_batch_size=8"]
    assert main(args) == 0
    result = json.loads((out / "winrate.json").read_text())
    final = [p for p in result["points"] if p["step"] is None]
    methods = {p["method"] for p in final}
    assert methods == {"Preferred-FT", "DPO beta=0.1", "best-of-2", "PPO", "2-shot base"}
    assert {p["temperature"] for p in final} == {0.0, 1.0}
    for p in result["points"]:
        assert p["n"] == 4 and p["wins"] + p["ties"] + p["fails"] <= 4
        assert p["ci_low"] <= p["win_rate"] <= p["ci_high"] and "length_controlled_win_rate" in p
    along = {(p["method"], p["step"]) for p in result["points"] if p["step"] is not None}  # along training
    assert {m for m, _ in along} == {"DPO beta=0.1", "PPO"} and ("PPO", 2) in along
    card = json.loads((out / "judge_card.json").read_text())
    assert card["pairs"] >= 4 and "informative" in card and result["informative"] == card["informative"]
    assert 0 <= card["prefers_empty_reply"] <= 1 and "uninformative_because" in card  # the empty-reply probe
    assert all(0 <= p["empty"] <= p["n"] for p in result["points"])
    assert result["judge"].startswith("rm:") and "judge-rm" in result["judge"]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["test_prompts"] == 4 and splits["judge_rm_pairs"] + splits["policy_rm_pairs"] == splits["train_pairs"]
    rows = (out / "comparisons.jsonl").read_text().splitlines()
    assert len(rows) == sum(p["n"] for p in result["points"])
    assert (out / "winrate.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "judge accuracy on held-out human labels" in printed
    # a second run into the same --out reuses every run and judgment
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="preftune"):
        assert main(args) == 0
    assert json.loads((out / "winrate.json").read_text())["points"] == result["points"]
    reused = {r.getMessage().split("runs/")[-1].split(" ")[0] for r in caplog.records if "reusing" in r.getMessage()}
    assert {"best-of-n", "two-shot", "preferred-ft", "judge-rm", "policy-rm"} <= reused  # nothing sampled again


def test_winrate_without_data_exits_2(tmp_path, capsys):
    assert main(["winrate", "--quick", "--out", str(tmp_path / "w"), "model=tiny",
                 f"winrate.data={tmp_path / 'absent.jsonl.gz'}"]) == 2
    assert "winrate.data" in capsys.readouterr().err
