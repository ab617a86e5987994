"""One ``--resume`` rule in every command that trains (dpo, sft, reward, ppo): the run continues in RUN_DIR with
the config saved there, ``key=value`` overrides apply on top, a YAML file given with it is refused (it used to be
silently dropped by dpo and sft), and another command's run directory is refused."""

from __future__ import annotations

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import load_config
from preftune.train.rundir import read_metrics

from conftest import write_jsonl

TRAIN = ["model=tiny", "train.progress=false", "train.precision=fp32", "train.num_threads=1", "run.plot=false"]
COMMANDS = {  # command -> (its own settings for a 2-step run, the override that asks for a third step)
    "dpo": (TRAIN + ["train.max_steps=2", "train.batch_size=2"], "train.max_steps=3"),
    "sft": (TRAIN + ["train.max_steps=2", "train.batch_size=2"], "train.max_steps=3"),
    "reward": (TRAIN + ["train.max_steps=2", "train.batch_size=2"], "train.max_steps=3"),
    "ppo": (["model=tiny", "train.precision=fp32", "train.num_threads=1", "run.plot=false", "ppo.iterations=2",
             "ppo.batch_size=2", "ppo.minibatch_size=2", "ppo.max_new_tokens=4", "ppo.scorer=vader"],
            "ppo.iterations=3"),
}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _data(command: str, pairs_file, tmp_path) -> list[str]:
    if command == "ppo":
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("the movie", "this film")])
        return [f"ppo.prompts={prompts}"]
    return [f"data.train={pairs_file}"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_resume_with_a_yaml_file_is_refused_before_anything_loads(command, tmp_path, capsys):
    config = tmp_path / "other.yaml"
    config.write_text("train:\n  seed: 3\n", encoding="utf-8")
    assert main([command, str(config), "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--resume takes its config from {tmp_path / 'run'}/config.yaml" in err and str(config) in err
    assert main([command, "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there (not a run directory)" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_resume_continues_in_run_dir_with_its_saved_config_and_overrides(command, tmp_path, pairs_file, capsys):
    settings, more = COMMANDS[command]
    run_dir = tmp_path / "run"
    assert main([command, *settings, *_data(command, pairs_file, tmp_path), f"run.dir={run_dir}"]) == 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["command"] == command
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    capsys.readouterr()
    # an override that changes what is trained is refused, before anything loads, naming the key and both values
    capsys.readouterr()
    assert main([command, "--resume", str(run_dir), more, "train.seed=7"]) == 2
    err = capsys.readouterr().err
    assert "these overrides change what the run trains: train.seed (saved 0, given 7)" in err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]  # nothing ran
    # the saved config (seed, sizes, data) is the run's; only the override changes, and the run stays in run_dir
    assert main([command, "--resume", str(run_dir), more, "train.seed=0"]) == 0  # the saved value: harmless
    key, value = more.split("=")
    section, name = key.split(".")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())[section][name] == int(value)  # recorded
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r or "reward" in r] == [1, 2, 3]
    saved_before = load_config(run_dir / "config.yaml", base=__import__(f"preftune.recipes.{command}",
                                                                         fromlist=["CONFIG"]).CONFIG())
    assert saved_before.run.dir == str(run_dir)
    # another command cannot resume this run directory: its saved config names the command it belongs to
    other = "sft" if command != "sft" else "dpo"
    assert main([other, "--resume", str(run_dir)]) == 2
    assert f"is a config for `preftune {command}`" in capsys.readouterr().err
