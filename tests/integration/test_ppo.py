"""`preftune ppo` end to end on the tiny model: metrics, KL = 0 before any update, SIGKILL + --resume =
uninterrupted, a learning sanity check, the value head's alignment, and config errors. One torch thread:
on a shared 2-core CPU two threads fighting other processes are several times slower than one."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.train.rundir import read_metrics

from conftest import write_jsonl

PROMPTS = ["the movie was", "i thought the acting", "this film", "overall the story"]
FAST = ["model=tiny", "train.precision=fp32", "train.num_threads=1", "run.plot=false", "ppo.batch_size=4",
        "ppo.minibatch_size=2", "ppo.max_new_tokens=6", "ppo.lr=1e-3"]
METRIC_KEYS = ("reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl", "kl_coef",
               "tokens_per_s", "lr", "reward_std", "non_score_reward", "value_clip_fraction", "grad_norm",
               "completion_tokens", "time/rollout_s", "time/update_s")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    """Prompts whose VADER scores differ (a random tiny model's tokens are neutral words or none): the rewards, and
    so the advantages and the update, are never all zero, whatever the seeded samples are."""
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in (
        "the movie was great", "i thought the acting was awful", "this film", "overall a lovely story")])


def test_ppo_cli_end_to_end(tmp_path, prompts_file, capsys):
    run_dir = tmp_path / "run"
    code = main(["ppo", *FAST, "ppo.scorer=vader", f"ppo.prompts={prompts_file}", "ppo.iterations=2",
                 "run.plot=true", f"run.dir={run_dir}"])
    assert code == 0, capsys.readouterr().err
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoints/latest", "policy/model.safetensors",
                 "policy/README.md",
                 "policy/tokenizer.json", "value_head.safetensors", "training.png"):
        assert (run_dir / name).exists(), name
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in METRIC_KEYS:
        assert all(key in r for r in rows), key
    # iteration 1 samples before any update: policy == reference, so every log-ratio is exactly 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["non_score_reward"] == pytest.approx(0.0, abs=1e-7)
    assert rows[1]["kl"] != 0.0  # the update moved the policy
    assert all(0.0 <= r["clip_fraction"] <= 1.0 and r["approx_kl"] >= 0.0 for r in rows)
    assert rows[0]["kl_coef"] == 0.1 and rows[0]["lr"] == pytest.approx(1e-3)
    # 4 prompts x 1 completion, a random tiny model never stops early: 6 tokens each
    assert rows[0]["completion_tokens"] == 6.0
    head = load_file(str(run_dir / "value_head.safetensors"))
    assert head["weight"].shape == (1, 64) and head["bias"].shape == (1,)
    assert head["weight"].abs().sum() > 0  # zero-initialised, then trained
    result = json.loads(capsys.readouterr().out)
    assert result["iterations"] == 2 and result["train"]["reward"] == pytest.approx(rows[-1]["reward"])


def _cli(args, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("fault,code,latest", [("after_step:3", -9, "step-000002"),  # SIGKILL after iteration 3
                                                ("sigterm:3", 143, "step-000003")])  # SIGTERM: a checkpoint at 3
def test_ppo_killed_or_stopped_and_resumed_equals_uninterrupted(tmp_path, prompts_file, fault, code, latest):
    args = ["ppo", *FAST, "ppo.scorer=vader", f"ppo.prompts={prompts_file}", "ppo.iterations=4", "ppo.save_every=2",
            "ppo.adaptive_kl=true", "ppo.horizon=10"]  # a moving kl_coef must be restored too
    assert main([*args, f"run.dir={tmp_path / 'straight'}"]) == 0  # in-process: one interpreter start less
    killed_dir = tmp_path / "killed"
    killed = _cli([*args, f"run.dir={killed_dir}"], env_extra={"PREFTUNE_FAULT": fault})
    assert killed.returncode == code, killed.stderr[-2000:]
    assert (killed_dir / "checkpoints" / "latest").read_text().strip() == latest
    assert not (killed_dir / "policy").exists()
    resumed = _cli(["ppo", "--resume", str(killed_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("policy/model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(killed_dir / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    straight_m, resumed_m = (read_metrics(d / "metrics.jsonl") for d in (tmp_path / "straight", killed_dir))
    assert [r["step"] for r in resumed_m] == [1, 2, 3, 4]  # iteration 3 logged once, not twice
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss"):
        assert [r[key] for r in resumed_m] == [r[key] for r in straight_m], key
    assert straight_m[-1]["kl_coef"] != 0.1  # the controller did move


def test_a_nan_ppo_update_skips_its_steps_and_counts_them(tmp_path, prompts_file, monkeypatch, caplog):
    """A NaN loss in iteration 2 of 2: neither minibatch step updates (the weights equal a 1-iteration run's),
    both are counted and warned about, and the run finishes."""
    args = ["ppo", *FAST, "ppo.scorer=vader", f"ppo.prompts={prompts_file}", "ppo.ppo_epochs=1"]  # 2 steps each
    assert main([*args, "ppo.iterations=1", f"run.dir={tmp_path / 'one'}"]) == 0
    monkeypatch.setenv("PREFTUNE_FAULT", "nan_loss:2")
    with caplog.at_level("WARNING", logger="preftune"):
        assert main([*args, "ppo.iterations=2", f"run.dir={tmp_path / 'nan'}"]) == 0
    assert "iteration 2, minibatch step 2 skipped: the loss or the gradient is not finite" in caplog.text
    for name in ("policy/model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "nan" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 2]
    assert "policy_loss" not in rows[1] and "grad_norm" not in rows[1] and rows[0]["grad_norm"] > 0


def test_a_ppo_loss_that_stays_nan_stops_the_run_with_the_last_checkpoint_intact(tmp_path, prompts_file):
    run_dir = tmp_path / "run"
    args = ["ppo", *FAST, "ppo.scorer=vader", f"ppo.prompts={prompts_file}", "ppo.ppo_epochs=1", "ppo.iterations=6",
            "ppo.save_every=1", "train.max_skipped_steps=3", f"run.dir={run_dir}"]
    stopped = _cli(args, env_extra={"PREFTUNE_FAULT": "nan_loss:2+"})
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "4 steps in a row had a non-finite loss or gradient (up to iteration 3, minibatch step 2" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (run_dir / "policy").exists()
    # the checkpoint of iteration 2 holds iteration 1's weights (both steps of iteration 2 were skipped)
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-000002"
    assert json.loads((latest / "trainer_state.json").read_text())["skipped_steps"] == 2
    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


class CountGood:
    """Reward = share of the 6 completion words that are "good" (the completion is the text's last 6 words)."""

    name = "count_good"

    def __call__(self, texts):
        return [sum(w == "good" for w in t.split()[-6:]) / 6 for t in texts]


def test_ppo_learns_to_say_good(tmp_path):
    """From an SFT start that says " good" or " bad" with probability 1/2 each (entropy ln 2 = 0.693), PPO with a
    reward for " good" must raise the reward and lower the entropy within 10 iterations; the eval hook runs
    every 5 iterations and is logged."""
    from preftune.config import load_config
    from preftune.recipes.ppo import load_ppo_config, run as run_ppo
    from preftune.recipes.sft import run as run_sft

    rng = random.Random(0)
    sft_rows = [{"prompt": p, "completion": "".join(rng.choice([" good", " bad"]) for _ in range(6))}
                for p in PROMPTS for _ in range(8)]
    sft_cfg = load_config(None, ["model=tiny", f"data.train={write_jsonl(tmp_path / 'sft.jsonl', sft_rows)}",
                                 "data.append_eos=false", "train.max_steps=30", "train.batch_size=8", "train.lr=1e-2",
                                 "train.optimizer=adamw", "train.precision=fp32", "train.num_threads=1",
                                 "train.progress=false", "run.plot=false", f"run.dir={tmp_path / 'sft'}"])
    run_sft(sft_cfg)
    cfg = load_ppo_config(None, [*FAST, f"model={tmp_path / 'sft' / 'policy'}", "ppo.iterations=10",
                                 "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.kl_coef=0.0", "ppo.eval_every=5",
                                 "train.progress=false", f"run.dir={tmp_path / 'ppo'}"])
    seen = []

    def hook(policy, step):
        seen.append((step, policy.training, torch.is_grad_enabled()))
        return {"marker": float(step)}

    result = run_ppo(cfg, scorer=CountGood(), prompts=PROMPTS, eval_hook=hook)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    train = [r for r in rows if "reward" in r]
    rewards = [r["reward"] for r in train]
    assert len(rewards) == 10
    assert train[0]["entropy"] == pytest.approx(0.693, abs=0.05)  # the SFT start: good/bad at 1/2 each
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards  # measured: 0.58 -> 0.99
    assert train[-1]["entropy"] < 0.3
    assert seen == [(5, False, False), (10, False, False)]
    assert [(r["step"], r["eval/marker"]) for r in rows if "eval/marker" in r] == [(5, 5.0), (10, 10.0)]
    assert result["eval"] == {"eval/marker": 10.0}
    saved = (tmp_path / "ppo" / "config.yaml").read_text()
    assert "custom:count_good" in saved and "prompts.jsonl" in saved  # the run records what it used


def test_value_head_reads_the_state_that_predicts_each_token(tiny_tokenizer):
    """Grid log-probs sum to the one log-prob function's per-sequence values, and V[b, t] is the head applied to
    the hidden state at the position that predicts completion token t."""
    from preftune.eval.sampling import Sample
    from preftune.models.load import load_causal_lm
    from preftune.models.logprobs import sequence_logps
    from preftune.rl.ppo_steps import PolicyWithValue, build_batch

    model = PolicyWithValue(load_causal_lm("tiny"))
    assert torch.equal(model.value_head.weight, torch.zeros(1, 64))  # zero-initialised
    torch.nn.init.normal_(model.value_head.weight, generator=torch.Generator().manual_seed(0))
    samples = [Sample("a", "", [1, 300, 301], [500, 501, 502]), Sample("b", "", [1, 302], [503])]
    batch = build_batch(samples, pad_id=0)
    assert batch["mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with torch.no_grad():
        logprobs, values, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"], 3)
        expected = sequence_logps(model.policy, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
        hidden = model.policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert logprobs.sum(1).tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert logprobs[1, 1:].tolist() == [0.0, 0.0] and values[1, 1:].tolist() == [0.0, 0.0]
    head = model.value_head
    # row 0: prompt has 3 tokens, so completion token t is predicted at position 2 + t; row 1: position 1
    assert values[0].tolist() == pytest.approx(head(hidden[0, 2:5]).squeeze(-1).tolist(), abs=1e-5)
    assert values[1, 0].item() == pytest.approx(head(hidden[1, 1]).item(), abs=1e-5)


@pytest.mark.parametrize("override, message", [
    ("train.lr=1e-3", "config key 'train.lr' is not used by ppo (set ppo.lr)"),
    ("ppo.minibatch_size=3", "must divide ppo.batch_size"),
    ("dpo.beta=0.5", "config key 'dpo.beta' is not used by ppo"),
    ("ppo.scorer=nope", "config key 'ppo.scorer': unknown scorer 'nope'"),
    ("ppo.lam=1.5", "config key 'ppo.lam' must be in [0, 1]"),
    ("ppo.cliprange=0.1", "unknown config key 'ppo.cliprange'"),
])
def test_bad_ppo_config_exits_2_before_loading(tmp_path, capsys, override, message):
    code = main(["ppo", "model=tiny", override, f"run.dir={tmp_path / 'r'}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_help_lists_every_ppo_key_with_its_default():
    from preftune.rl.settings import PPOSettings
    from preftune.recipes.ppo import _PPO_KEYS

    for f in dataclasses.fields(PPOSettings):
        default = f.default
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert f"ppo.{f.name} ({shown})" in _PPO_KEYS, f.name


def test_an_in_process_resume_reads_the_runs_own_prompts(tmp_path):
    """The frontier resumes a PPO arm in-process with a fresh config and its prompts: the run continues on its own
    RUN/prompts.jsonl (not ppo.prompts' default pool) and equals a straight run; other prompts are refused."""
    from preftune.errors import ConfigError
    from preftune.recipes.ppo import load_ppo_config, run as run_ppo

    def config(name, iterations):
        return load_ppo_config(None, [*FAST, "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.save_every=1",
                                      f"ppo.iterations={iterations}", "train.progress=false",
                                      f"run.dir={tmp_path / name}"])

    run_ppo(config("straight", 3), scorer=CountGood(), prompts=PROMPTS)
    run_ppo(config("resumed", 2), scorer=CountGood(), prompts=PROMPTS)
    run_ppo(config("resumed", 3), scorer=CountGood(), prompts=PROMPTS, resume=True)
    straight, resumed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "resumed"))
    assert [r["reward"] for r in resumed] == [r["reward"] for r in straight] and len(straight) == 3
    with pytest.raises(ConfigError, match="the prompts given differ from the run's own"):
        run_ppo(config("resumed", 4), scorer=CountGood(), prompts=PROMPTS[:-1], resume=True)
