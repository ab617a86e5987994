"""Training invariants on the tiny model: accumulation, resume after SIGKILL, crash mid-save, metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import TrainConfig, load_config
from preftune.train.loop import DataOrder, lr_factor, resolved_warmup
from preftune.train.rundir import read_metrics

from conftest import write_jsonl

COMMON = ["model=tiny", "train.precision=fp32", "train.progress=false", "run.plot=false", "train.lr=1e-3",
          "train.optimizer=adamw"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "policy" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


@pytest.mark.parametrize("command", ["dpo", "sft"])
def test_grad_accumulation_1x8_equals_8x1(tmp_path, pairs_file, command):
    from preftune.recipes.dpo import run as run_dpo
    from preftune.recipes.sft import run as run_sft

    run = run_dpo if command == "dpo" else run_sft
    dirs = {}
    for name, bs, accum in (("1x8", 8, 1), ("8x1", 1, 8)):
        dirs[name] = tmp_path / name
        cfg = load_config(None, COMMON + [f"data.train={pairs_file}", "train.max_steps=3",
                                          f"train.batch_size={bs}", f"train.grad_accum_steps={accum}",
                                          f"run.dir={dirs[name]}"])
        run(cfg)
    # Adam normalises each gradient element, so float-rounding noise in near-zero gradients moves weights by a
    # few percent of one lr step (1e-3); a scaling bug is caught by the grad_norm and loss comparison below.
    _assert_same_weights(dirs["1x8"], dirs["8x1"], atol=5e-5)
    m1, m8 = read_metrics(dirs["1x8"] / "metrics.jsonl"), read_metrics(dirs["8x1"] / "metrics.jsonl")
    for key in ("loss", "grad_norm") + (("rewards/accuracies", "rewards/margins", "logps/chosen")
                                        if command == "dpo" else ()):
        assert [r[key] for r in m1] == pytest.approx([r[key] for r in m8], rel=1e-4, abs=1e-6), key
    if command == "dpo":
        assert m1[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 1
        assert all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in m1 + m8)


def test_sft_loss_is_token_mean_over_the_whole_step(tmp_path):
    """Two examples of very different lengths: the logged loss is total NLL / total tokens (not a mean of means)."""
    from preftune.models.load import load_causal_lm, load_tokenizer
    from preftune.data.splits import load_tokenized_examples
    from preftune.recipes.sft import run as run_sft
    from preftune.train.objectives import evaluate_examples

    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "A", "completion": " b"},
                                                {"prompt": "C", "completion": " d e f g h i j k l m n o p q"}])
    cfg = load_config(None, COMMON + [f"data.train={data}", "train.max_steps=1", "train.batch_size=1",
                                      "train.grad_accum_steps=2", "train.lr=1e-12", f"run.dir={tmp_path / 'r'}"])
    tok = load_tokenizer("tiny")
    items, _ = load_tokenized_examples(cfg, tok)
    expected = evaluate_examples(load_causal_lm("tiny"), items, tok.pad_token_id, 8, torch.device("cpu"))["loss"]
    run_sft(cfg)
    logged = read_metrics(tmp_path / "r" / "metrics.jsonl")[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_lr_schedule_and_warmup():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=None, schedule="cosine")
    assert resolved_warmup(cfg) == 10  # the paper's 150 steps, capped at 10% of a short run
    assert resolved_warmup(TrainConfig(max_steps=5000)) == 150
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(55, TrainConfig(max_steps=100, schedule="constant")) == 1.0
    assert lr_factor(99, TrainConfig(max_steps=100, warmup_steps=0, schedule="linear")) == pytest.approx(0.01)


def test_data_order_is_seeded_and_resumable():
    a, b = DataOrder(10, seed=3), DataOrder(10, seed=3)
    first = a.take(7)
    state = a.state()
    rest = a.take(9)  # crosses into epoch 1
    b.load(state)
    assert b.take(9) == rest
    assert sorted(first + rest[:3]) == list(range(10))  # epoch 0 is a permutation
    assert DataOrder(10, seed=4).take(10) != DataOrder(10, seed=3).take(10)


def _cli(args, env_extra=None, cwd=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, pairs_file):
    """Weights and metrics rows (steps 2, 4, 6, 8) equal an uninterrupted run; the row at step 4 averages steps 3
    and 4 across the kill (the checkpoint at step 3 carries the window's running sums)."""
    args = COMMON + [f"data.train={pairs_file}", "train.max_steps=8", "train.batch_size=2", "train.save_every=3",
                     "train.log_every=2"]
    straight = _cli(["dpo", *args, f"run.dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    killed = _cli(["dpo", *args, f"run.dir={killed_dir}"], env_extra={"PREFTUNE_FAULT": "after_step:5"})
    assert killed.returncode == -9  # SIGKILL
    assert not (killed_dir / "policy").exists()
    assert (killed_dir / "checkpoints" / "latest").read_text().strip() == "step-000003"
    resumed = _cli(["dpo", "--resume", str(killed_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_weights(tmp_path / "straight", killed_dir, atol=0.0)
    straight_m = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed_m = read_metrics(killed_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed_m] == [r["step"] for r in straight_m] == [2, 4, 6, 8]  # none twice or missing
    for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"):
        assert [r[key] for r in resumed_m] == pytest.approx([r[key] for r in straight_m], abs=1e-7), key


def test_crash_mid_save_leaves_previous_checkpoint_usable(tmp_path, pairs_file):
    run_dir = tmp_path / "run"
    args = COMMON + [f"data.train={pairs_file}", "train.max_steps=8", "train.batch_size=2", "train.save_every=2",
                     f"run.dir={run_dir}"]
    crashed = _cli(["dpo", *args], env_extra={"PREFTUNE_FAULT": "mid_save:4"})
    assert crashed.returncode == -9
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert not (run_dir / "checkpoints" / "step-000004").exists()  # the half-written one never took its name
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = (run_dir / "metrics.jsonl").read_text()
    resumed = _cli(["dpo", "--resume", str(copy)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_metrics(copy / "metrics.jsonl")[-1]["step"] == 8
    assert (copy / "policy").is_dir() and not (run_dir / "policy").exists()  # the original is left alone
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_shared_and_packed_training_match_padded(tmp_path, pairs_file):
    from preftune.recipes.dpo import run as run_dpo

    rows = {}
    for layout in ("padded", "prefix_shared", "packed"):
        cfg = load_config(None, COMMON + [f"data.train={pairs_file}", f"data.eval={pairs_file}", "train.max_steps=3",
                                          "train.batch_size=4", f"train.layout={layout}", "train.eval_every=3",
                                          f"run.dir={tmp_path / layout}"])
        run_dpo(cfg)
        rows[layout] = read_metrics(tmp_path / layout / "metrics.jsonl")
    for layout in ("prefix_shared", "packed"):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval/loss"):
            assert any(key in r for r in rows["padded"]) and any(key in r for r in rows[layout]), (layout, key)
            assert [r[key] for r in rows["padded"] if key in r] == pytest.approx(
                [r[key] for r in rows[layout] if key in r], rel=1e-4, abs=1e-5), (layout, key)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, pairs_file, lora):
    """Recomputing activations in the backward gives the same losses, gradients and weights (also under LoRA,
    whose frozen embeddings give the checkpointed layers inputs that need no grad)."""
    from preftune.recipes.dpo import run as run_dpo

    for gc in (False, True):
        run_dpo(load_config(None, COMMON + [f"data.train={pairs_file}", "train.max_steps=3", "train.batch_size=4",
                                            f"train.gradient_checkpointing={gc}", f"lora.enabled={lora}",
                                            f"run.dir={tmp_path / str(gc)}"]))
    plain, checkpointed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("False", "True"))
    for key in ("loss", "grad_norm", "logps/rejected"):
        assert [r[key] for r in plain] == pytest.approx([r[key] for r in checkpointed], rel=1e-5, abs=1e-6), key
    assert plain[-1]["grad_norm"] > 0


def test_gradient_checkpointing_is_switched_on(tiny_model):
    from preftune.train.runtime import prepare_for_training

    assert not tiny_model.is_activation_checkpointing
    prepare_for_training(tiny_model, load_config(None, ["train.gradient_checkpointing=true"]))
    assert tiny_model.is_activation_checkpointing and not tiny_model.config.use_cache


def test_save_final_false_writes_metrics_only(tmp_path, pairs_file):
    from preftune.recipes.dpo import run as run_dpo

    run_dir = tmp_path / "run"
    run_dpo(load_config(None, COMMON + [f"data.train={pairs_file}", "train.max_steps=2", "train.batch_size=4",
                                        "train.save_final=false", f"run.dir={run_dir}"]))
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "policy").exists() and not list(run_dir.glob("checkpoints/step-*"))


def test_train_device(monkeypatch):
    from preftune.config import ConfigError
    from preftune.train.runtime import pick_device

    assert pick_device(load_config(None, ["train.device=cpu"])) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(load_config(None, [])) == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device.*not available"):
        pick_device(load_config(None, ["train.device=cuda"]))
    with pytest.raises(ConfigError, match="train.device.*not a device"):
        pick_device(load_config(None, ["train.device=gpu0"]))


def test_tied_embedding_gets_a_sparse_backward_and_the_same_dense_gradient(tiny_model, tiny_tokenizer):
    from preftune.models.load import load_causal_lm
    from preftune.models.logprobs import sequence_logps
    from preftune.train.runtime import prepare_for_training

    assert tiny_model.get_input_embeddings().weight is tiny_model.get_output_embeddings().weight  # tied
    plain = load_causal_lm("tiny", seed=0)
    prepare_for_training(tiny_model, load_config(None, []))
    assert tiny_model.get_input_embeddings().sparse and not plain.get_input_embeddings().sparse
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    labels = ids.clone()
    labels[:, :3] = -100
    for model in (plain, tiny_model):
        sequence_logps(model, ids, torch.ones_like(ids), labels).logps.sum().backward()
    a, b = plain.get_input_embeddings().weight.grad, tiny_model.get_input_embeddings().weight.grad
    assert not b.is_sparse and torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("command", ["dpo", pytest.param("sft", marks=pytest.mark.slow),
                                     pytest.param("reward", marks=pytest.mark.slow)])  # 30-50 s each
def test_compiled_model_trains_like_the_eager_one(tmp_path, pairs_file, command):
    """train.compile=true (inductor) compiles the trained model's decoder in every training command (dynamo's
    graph count: none eager, some compiled) and gives the eager run's losses and gradient norms. DPO's tied
    embedding keeps its dense backward there: inductor cannot compile a backward that makes a sparse gradient."""
    from torch._dynamo.utils import counters

    from preftune.recipes import dpo, reward, sft

    recipe = {"dpo": dpo, "sft": sft, "reward": reward}[command]
    base = {"dpo": None, "sft": sft.SFTRunConfig(), "reward": reward.RewardRunConfig()}[command]
    graphs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        recipe.run(load_config(None, COMMON + [f"data.train={pairs_file}", "train.max_steps=2", "train.batch_size=4",
                                               f"train.compile={compiled}", "train.save_final=false",
                                               f"run.dir={tmp_path / str(compiled)}"], base=base))
        graphs[compiled] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] > 0, graphs
    eager, compiled = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("False", "True"))
    keys = ("loss", "grad_norm") + (("logps/chosen",) if command == "dpo" else ())
    for key in keys:
        assert [r[key] for r in eager] == pytest.approx([r[key] for r in compiled], rel=1e-4, abs=1e-5), key


def test_train_epochs_sets_max_steps_from_the_data(tmp_path, pairs_file):
    """train.epochs=2 over 8 pairs, 2 per step: 8 steps, recorded as train.max_steps in RUN/config.yaml; the
    data order's epoch counter agrees."""
    import yaml

    from preftune.train.rundir import read_metrics

    assert main(["dpo", "model=tiny", f"data.train={pairs_file}", "train.epochs=2", "train.batch_size=2",
                 "train.progress=false", "run.plot=false", f"run.dir={tmp_path / 'run'}"]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) and [r["epoch"] for r in rows] == [0] * 4 + [1] * 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 8
    assert main(["dpo", "model=tiny", f"data.train={pairs_file}", "train.epochs=0"]) == 2
