"""``preftune reward`` end to end on the tiny model: it learns a learnable preference, its run directory and
reward model are complete, ``--resume`` restores the head, and ``preftune score --scorer rm:PATH`` works."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.train.rundir import read_metrics

from conftest import write_jsonl

FAST = ["model=tiny", "train.progress=false", "train.precision=fp32", "train.lr=1e-3", "train.optimizer=adamw"]
NOUNS = ["movie", "plot", "cast", "script", "ending", "score", "story", "pacing", "camera work", "dialogue",
         "lead actor", "villain", "soundtrack", "editing", "set design", "costume work"]
FILLERS = ["from what I saw", "all things considered", "if you ask me", "by the last act", "in my opinion",
           "for a summer film", "as far as I could tell", "on the whole"]


def _pairs(nouns, fillers, per_noun=2):
    """The chosen response always carries the word 'excellent', the rejected one 'ordinary' in its place."""
    return [{"prompt": f"The {n}", "chosen": f" was excellent, {f}.", "rejected": f" was ordinary, {f}."}
            for i, n in enumerate(nouns) for f in (fillers * 2)[i % len(fillers):][:per_noun]]


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One training run shared by the tests below: 24 train pairs; 8 held-out pairs whose nouns and fillers the
    training pairs never contain."""
    root = tmp_path_factory.mktemp("reward")
    train = write_jsonl(root / "train.jsonl", _pairs(NOUNS[:12], FILLERS[:6]))
    held = write_jsonl(root / "held.jsonl", _pairs(NOUNS[12:], FILLERS[6:]))
    run_dir = root / "run"
    code = main(["reward", *FAST, f"data.train={train}", f"data.eval={held}", "train.max_steps=8",
                 "train.batch_size=8", "train.eval_every=4", "train.log_every=1", f"run.dir={run_dir}"])
    assert code == 0
    return run_dir, held


def test_reward_learns_a_learnable_preference(learned):
    run_dir, _ = learned
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["step"] for r in eval_rows] == [4, 8]
    first = train_rows[0]
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm", "lr",
                "pairs_per_s", "tokens_per_s"):
        assert key in first, key
    assert train_rows[-1]["accuracy"] == 1.0 and train_rows[-1]["loss"] < min(0.4, first["loss"])
    assert eval_rows[-1]["eval/accuracy"] > 0.5 and eval_rows[-1]["eval/rewards/margins"] > 0
    for key in ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected"):
        assert key in eval_rows[-1], key


def test_reward_run_directory_and_saved_model(learned):
    from preftune.models.reward_model import RewardModel

    run_dir, held = learned
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoints/latest", "reward_model/config.json",
                 "reward_model/model.safetensors", "reward_model/tokenizer.json",
                 "reward_model/reward_head.safetensors", "reward_model/reward_config.json"):
        assert (run_dir / name).exists(), name
    assert "reward:" in (run_dir / "config.yaml").read_text()
    info = json.loads((run_dir / "reward_model" / "reward_config.json").read_text())
    assert info["base_model"] == "tiny" and info["append_eos"] is True and info["normalization"]["n"] == 48
    assert info["head_init"] == "normal" and info["seed"] == 0
    # the saved head is the checkpoint's head: what fit trained is what was written
    ckpt = load_file(str(run_dir / "checkpoints" / "step-000008" / "model.safetensors"))
    head = load_file(str(run_dir / "reward_model" / "reward_head.safetensors"))["weight"]
    assert torch.equal(ckpt["head.weight"], head) and torch.count_nonzero(head) > 0
    # normalisation: the training responses' normalised scores have mean 0 and std 1
    from preftune.data.records import read_preference_pairs
    from preftune.data.tokenize import tokenize_pair

    model = RewardModel.load(run_dir / "reward_model")
    pairs, _ = read_preference_pairs(run_dir.parent / "train.jsonl")
    items = [tokenize_pair(model.tokenizer, p, max_length=512, max_prompt_tokens=256) for p in pairs]
    scores = model.score_ids([p.prompt_ids for p in items] * 2,
                             [p.chosen_ids for p in items] + [p.rejected_ids for p in items])
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_score_cli_with_the_trained_reward_model(learned, tmp_path, capsys):
    run_dir, _ = learned
    samples = write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": "The villain", "completion": " was excellent, on the whole."},
        {"prompt": "The villain", "completion": " was ordinary, on the whole."}])
    code, out, err = _run(capsys, ["score", str(samples), "--scorer", f"rm:{run_dir / 'reward_model'}"])
    assert code == 0, err
    good, bad = [json.loads(line)["score_rm"] for line in samples.read_text().splitlines()]
    assert good > bad
    assert f"{(good + bad) / 2:.4f}" in out


def test_score_cli_on_conversation_prompts(learned, tmp_path, capsys):
    """`preftune sample` of chat prompts writes conversations: a reward model scores each reply after the
    conversation rendered by its chat template (exactly its score_replies), VADER the reply alone; a string row
    beside them keeps the full-text path."""
    from preftune.eval.scorers import get_scorer
    from preftune.models.reward_model import RewardModel

    run_dir, _ = learned
    chat = [{"role": "user", "content": "How was the villain?"}]
    rows = [{"prompt": chat, "completion": "He was excellent."}, {"prompt": chat, "completion": "Awful, truly."},
            {"prompt": "The villain", "completion": " was excellent, on the whole."}]
    samples = write_jsonl(tmp_path / "samples.jsonl", rows)
    code, _, err = _run(capsys, ["score", str(samples), "--scorer", f"rm:{run_dir / 'reward_model'}", "--out",
                                 str(tmp_path / "rm.jsonl")])
    assert code == 0, err
    got = [json.loads(line)["score_rm"] for line in (tmp_path / "rm.jsonl").read_text().splitlines()]
    model = RewardModel.load(run_dir / "reward_model")
    assert got[:2] == pytest.approx(model.score_replies([chat, chat], ["He was excellent.", "Awful, truly."]))
    assert got[2] == pytest.approx(model.score_texts(["The villain was excellent, on the whole."])[0])
    code, _, err = _run(capsys, ["score", str(samples), "--scorer", "vader", "--out", str(tmp_path / "v.jsonl")])
    assert code == 0, err
    vader = [json.loads(line)["score_vader"] for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert vader[:2] == pytest.approx(get_scorer("vader")(["He was excellent.", "Awful, truly."]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "robot", "content": "x"}], "completion": "y"}])
    code, _, err = _run(capsys, ["score", str(bad), "--scorer", "vader"])
    assert code == 2 and "bad.jsonl:1: field 'prompt': message #1: role 'robot'" in err


def test_resume_restores_the_head(tmp_path, capsys):
    """Train 4 steps (checkpoints at 2 and 4); resume a copy from step 2: the final weights, head included,
    are identical to the uninterrupted run's (a head not restored from the checkpoint would restart at zero)."""
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(NOUNS[:4], FILLERS[:4]))
    straight = tmp_path / "straight"
    code, out, err = _run(capsys, ["reward", *FAST, f"data.train={train}", "train.max_steps=4",
                                   "train.batch_size=2", "train.save_every=2", "reward.head_init=zeros",
                                   f"run.dir={straight}"])
    assert code == 0, err
    assert json.loads(out)["step"] == 4
    first = read_metrics(straight / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: every score is 0 at step 1
    assert first["accuracy"] == 0.0 and first["rewards/margins"] == 0.0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    (resumed / "checkpoints" / "latest").write_text("step-000002")
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "reward_model")
    step2_head = load_file(str(resumed / "checkpoints" / "step-000002" / "model.safetensors"))["head.weight"]
    assert torch.count_nonzero(step2_head) > 0
    code, out, err = _run(capsys, ["reward", "--resume", str(resumed)])
    assert code == 0, err
    assert json.loads(out)["run_dir"] == str(resumed)  # the run continues where --resume points
    for name in ("reward_head.safetensors", "model.safetensors"):
        a = load_file(str(straight / "reward_model" / name))
        b = load_file(str(resumed / "reward_model" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [1, 2, 3, 4]


def test_reward_help_and_refused_options(tmp_path, pairs_file, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reward", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: preftune reward" in out and "reward.normalize" in out and "--resume" in out
    assert "dpo.beta (0.1)" not in out
    for bad, key in (("dpo.beta=0.5", "dpo"), ("lora.enabled=true", "lora"), ("reward.nope=1", "reward.nope"),
                     ("reward.head_init=ones", "reward.head_init")):
        code, _, err = _run(capsys, ["reward", *FAST, f"data.train={pairs_file}", bad, f"run.dir={tmp_path / 'r'}"])
        assert code == 2 and f"'{key}'" in err, err
    assert not (tmp_path / "r" / "reward_model").exists()
    # train.save_final=false: metrics only, as for dpo and sft (no reward model, no final checkpoint)
    code, out, err = _run(capsys, ["reward", *FAST, f"data.train={pairs_file}", "train.max_steps=1",
                                   "train.save_final=false", f"run.dir={tmp_path / 'm'}"])
    assert code == 0, err
    assert json.loads(out)["reward_model"] is None and read_metrics(tmp_path / "m" / "metrics.jsonl")
    assert not (tmp_path / "m" / "reward_model").exists() and not (tmp_path / "m" / "checkpoints").exists()
