"""`preftune frontier --quick` end to end on the tiny model: every method yields points, the JSON and the plot."""

import json
import math
from pathlib import Path

import pytest

from preftune.cli import main


def test_frontier_quick_on_tiny(tmp_path, capsys, caplog):
    out = tmp_path / "frontier"
    args = ["frontier", "--quick", "--out", str(out), "model=tiny", "train.precision=fp32", "train.batch_size=4",
                 "train.lr=1e-3", "train.num_threads=1", "frontier.train_prompts=12", "frontier.heldout_prompts=4",
                 "frontier.samples_per_prompt=2", "frontier.pairs_per_prompt=1", "frontier.min_score_gap=0",
                 "frontier.max_new_tokens=6", "frontier.dpo_steps=4", "frontier.sft_steps=4",
                 "frontier.reward_steps=4", "frontier.ppo_iterations=2", "frontier.ppo_batch_size=4",
                 "frontier.best_of_n=2,4", "train.layout=prefix_shared"]  # DPO's layout: the SFT arm pads
    assert main(args) == 0
    result = json.loads((out / "frontier.json").read_text())
    points = result["points"]
    assert {p["method"] for p in points} == {"reference", "DPO", "Preferred-FT", "PPO", "PPO-GT", "best-of-N"}
    for p in points:
        assert set(p) >= {"method", "setting", "step", "kl", "reward", "reward_ci"}
        assert 0.0 <= p["reward"] <= 1.0 and p["reward_ci"] >= 0
    # DPO and Preferred-FT are evaluated at each checkpoint along training (2 points each with --quick)
    assert sorted(p["step"] for p in points if p["method"] == "DPO") == [2, 4]
    bon = {p["setting"]: p["kl"] for p in points if p["method"] == "best-of-N"}
    assert bon["N=4"] == pytest.approx(math.log(4) - 3 / 4)  # the analytic best-of-N KL
    assert result["budget"]["dpo_settings"] == result["budget"]["ppo_settings"] == 1
    assert (out / "frontier.png").stat().st_size > 10_000
    assert "best-of-N" in capsys.readouterr().out
    # every arm computes where the frontier's train section says: PPO's too (its train section is its own)
    import yaml

    for arm in ("dpo-beta0.1", "ppo-0.05", "ppo-gt-0.05"):
        assert yaml.safe_load((out / "runs" / arm / "config.yaml").read_text())["train"]["precision"] == "fp32", arm
    # evaluated checkpoints are dropped (a SmolLM2 frontier kept ~30 GB of them); final policies stay
    assert not list(out.glob("runs/*/checkpoints")) and (out / "runs" / "dpo-beta0.1" / "policy").is_dir()

    # the same --out again: every finished run is reused (same settings), and the points are the same
    first = points
    _stopped_and_resumed_gives_the_same_points(tmp_path, [a if a != str(out) else str(tmp_path / "stopped")
                                                          for a in args], first)
    caplog.set_level("INFO", logger="preftune.recipes")
    assert main(args) == 0
    reused = sorted(Path(r.getMessage().split()[1]).name for r in caplog.records if "reusing" in r.getMessage())
    assert reused == ["best-of-n", "dpo-beta0.1", "ppo-0.05", "ppo-gt-0.05", "preferred-ft", "reward"]
    assert json.loads((out / "frontier.json").read_text())["points"] == first
    # a changed PPO setting re-runs the PPO runs only; changed N, best-of-N only
    caplog.clear()
    assert main(args + ["frontier.ppo_lr=3e-5", "frontier.best_of_n=2"]) == 0
    reused = sorted(r.getMessage().split()[1] for r in caplog.records if "reusing" in r.getMessage())
    assert [Path(x).name for x in reused] == ["dpo-beta0.1", "preferred-ft", "reward"]
    # a changed train.lr re-runs DPO and Preferred-FT (which read it) but not the reward model (it sets its own
    # lr), best-of-N (it reads the reward model) nor PPO (its lr is frontier.ppo_lr)
    caplog.clear()
    assert main(args + ["frontier.ppo_lr=3e-5", "frontier.best_of_n=2", "train.lr=2e-3"]) == 0
    reused = sorted(r.getMessage().split()[1] for r in caplog.records if "reusing" in r.getMessage())
    assert [Path(x).name for x in reused] == ["best-of-n", "ppo-0.05", "ppo-gt-0.05", "reward"]
    # PPO-GT alone (how it is run to convergence): no DPO, PPO, Preferred-FT or best-of-N, and no reward model
    caplog.clear()
    assert main(args + ["frontier.ppo_lr=3e-5", "train.lr=2e-3", "frontier.dpo_betas=", "frontier.ppo_kl_coefs=",
                        "frontier.preferred_ft=false", "frontier.best_of_n="]) == 0
    reused = [r.getMessage().split()[1] for r in caplog.records if "reusing" in r.getMessage()]
    assert [Path(x).name for x in reused] == ["ppo-gt-0.05"]
    alone = json.loads((out / "frontier.json").read_text())
    assert {p["method"] for p in alone["points"]} == {"reference", "PPO-GT"}
    assert alone["budget"]["reward_model_heldout_accuracy"] is None


def test_reuse_keys_hold_only_set_values():
    """A reuse key lists the values that differ from the defaults: a key added later at its default leaves old
    keys valid, and any set value still changes the key."""
    from preftune.config import TrainConfig
    from preftune.recipes.frontier import _changed

    assert _changed(TrainConfig(), TrainConfig()) == {}
    assert _changed(TrainConfig(lr=1e-3, seed=3), TrainConfig()) == {"lr": 1e-3, "seed": 3}
    assert _changed(TrainConfig(), TrainConfig(lr=1e-3)) == {"lr": TrainConfig().lr}


def _stopped_and_resumed_gives_the_same_points(tmp_path, args, expected):
    """SIGTERM after step 3 of the first arm (DPO, 4 steps): the frontier exits 143 with that arm's checkpoint
    written; the same command again resumes the arm from it (not from scratch) and ends with the same points."""
    import os
    import subprocess
    import sys

    out = tmp_path / "stopped"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PREFTUNE_FAULT="sigterm:3")
    stopped = subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, env=env,
                             timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert (out / "runs" / "dpo-beta0.1" / "checkpoints" / "latest").read_text().strip() == "step-000003"
    env.pop("PREFTUNE_FAULT")
    resumed = subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "dpo-beta0.1 from its last checkpoint" in resumed.stderr
    assert json.loads((out / "frontier.json").read_text())["points"] == expected


def test_a_ppo_arms_points_come_from_its_logged_evaluations(tmp_path):
    """A PPO arm resumes from its last checkpoint (taken at each evaluation) and reads its points back from the
    eval rows it logged; an evaluation logged twice (stopped after it, before its checkpoint) counts once."""
    from preftune.recipes.frontier import _ppo_points

    def row(step, reward):
        return {"step": step, "eval/oracle_reward": reward, "eval/oracle_reward_ci95": 0.1,
                "eval/kl_heldout": step / 10, "eval/kl_heldout_ci95": 0.2}

    rows = [row(0, 0.5), {"step": 1, "reward": 0.3}, row(2, 0.55), row(4, 0.6), row(4, 0.6), row(6, 0.7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert _ppo_points("PPO", "kl_coef=0.05", tmp_path) == [
        {"method": "PPO", "setting": "kl_coef=0.05", "step": s, "kl": s / 10, "kl_ci": 0.2, "reward": r,
         "reward_ci": 0.1} for s, r in ((0, 0.5), (2, 0.55), (4, 0.6), (6, 0.7))]
