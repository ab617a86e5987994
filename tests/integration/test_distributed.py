"""Several processes (torchrun / accelerate launch, gloo on CPU): data-parallel DPO equals one process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.train.rundir import read_metrics

from conftest import write_jsonl

COMMON = ["model=tiny", "train.precision=fp32", "train.progress=false", "run.plot=false", "train.lr=1e-3",
          "train.optimizer=adamw", "train.max_steps=3", "train.log_every=1", "train.save_every=2"]


def _run(args: list[str], processes: int, env_extra: dict | None = None, command: str = "dpo"
         ) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
                if processes > 1 else [sys.executable, "-m"])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([*launcher, "preftune.cli", command, *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_two_processes_equal_one_with_their_combined_batch(tmp_path, pairs_file):
    """2 processes x (batch 1 x 2 accumulation steps) = 1 process x batch 4: the same weights and metrics rows
    (the loss is normalised by the global pair count, metrics are summed over processes), one metrics file
    written once, one checkpoint and policy."""
    data = [f"data.train={pairs_file}", "data.eval_fraction=0.5"]  # 4 train pairs, 4 held out
    single = _run(COMMON + data + ["train.batch_size=4", f"run.dir={tmp_path / 'one'}"], 1)
    assert single.returncode == 0, single.stderr[-3000:]
    # a launcher's mixed-precision setting must not slip accelerate's autocast under train.precision=fp32
    multi = _run(COMMON + data + ["train.batch_size=1", "train.grad_accum_steps=2", f"run.dir={tmp_path / 'two'}"], 2,
                 {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two if "loss" in r] == [r["step"] for r in one if "loss" in r] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                "eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"):  # eval: 2 pairs per process, summed
        assert any(key in r for r in one) and any(key in r for r in two), key  # a renamed metric is not "equal"
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5,
                                                                    abs=1e-6), key
    assert len([r for r in two if "eval/loss" in r]) == 1
    assert one[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    wa, wb = (load_file(str(tmp_path / name / "policy" / "model.safetensors")) for name in ("one", "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 5e-5  # Adam on float-rounding noise: see 1x8
    assert (tmp_path / "two" / "checkpoints" / "step-000003").is_dir()


def test_two_processes_with_a_precomputed_reference(tmp_path, pairs_file):
    """Each process computes half of the reference log-probs, process 0 caches the whole, and a second run reads
    the cache (process 0 reads it, the other receives the values: no shared directory needed); training equals
    one process with a live reference (to the fp32 noise of a batch-dependent forward)."""
    data = [f"data.train={pairs_file}", f"reference.cache_dir={tmp_path / 'cache'}"]
    single = _run(COMMON + data + ["train.batch_size=4", f"run.dir={tmp_path / 'one'}"], 1)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(COMMON + data + ["train.batch_size=2", "reference.mode=precomputed", f"run.dir={tmp_path / 'two'}"],
                 2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    shares = sorted(line.split("INFO preftune.models.reference: ")[1] for line in multi.stderr.splitlines()
                    if "reference log-probs" in line and " computed " in line)
    assert shares == ["process 0 computed 4 of 8 reference log-probs", "process 1 computed 4 of 8 reference log-probs"]
    assert multi.stderr.count("computing 8 pairs") == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-5), key
    again = _run(COMMON + data + ["train.batch_size=2", "reference.mode=precomputed", f"run.dir={tmp_path / 'again'}"],
                 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing cache") == 1 and " computed " not in again.stderr
    assert [r["loss"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl")] == [r["loss"] for r in two]


@pytest.fixture(scope="module")
def straight_on_two(tmp_path_factory):
    """(arguments, run directory) of one uninterrupted 5-step run on 2 processes, shared by the resume tests."""
    from conftest import PAIRS

    root = tmp_path_factory.mktemp("two")
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    args = COMMON + [f"data.train={pairs}", "train.max_steps=5", "train.batch_size=1", "train.grad_accum_steps=2"]
    straight = _run(args + [f"run.dir={root / 'straight'}"], 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    return args, root / "straight"


@pytest.mark.parametrize("fault,latest", [
    pytest.param("after_step:3", "step-000002", marks=pytest.mark.slow),  # SIGKILL: the checkpoint before (time:
    ("sigterm:3@1", "step-000003")])  # -m slow; SIGKILL + resume stays in make test on one process) / SIGTERM to 1
def test_two_processes_killed_and_resumed_equal_an_uninterrupted_run(tmp_path, straight_on_two, fault, latest):
    """A SIGTERM that reaches one process stops both after the same step (they ask each other once per step),
    with a checkpoint written there."""
    args, reference = straight_on_two
    (tmp_path / "straight").symlink_to(reference)
    killed = _run(args + [f"run.dir={tmp_path / 'killed'}"], 2, {"PREFTUNE_FAULT": fault})
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "latest").read_text() == latest
    if fault.startswith("sigterm"):
        assert killed.stderr.count("stopped by SIGTERM after step 3: checkpoint written") == 2, killed.stderr[-3000:]
    resumed = _run(["--resume", str(tmp_path / "killed")], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "killed"))
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    wa, wb = (load_file(str(tmp_path / name / "policy" / "model.safetensors")) for name in ("straight", "killed"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize("command, keys", [("sft", ("loss", "grad_norm", "eval/loss", "eval/perplexity")),
                                           ("reward", ("loss", "grad_norm", "accuracy", "rewards/margins",
                                                       "eval/loss", "eval/accuracy"))])
def test_sft_and_reward_on_two_processes_equal_one(tmp_path, pairs_file, command, keys):
    """SFT normalises by tokens, which differ between the processes' slices: the global token count makes 2 x
    batch 2 equal 1 x batch 4. The reward model trains the same way as DPO."""
    args = COMMON + [f"data.train={pairs_file}", "data.eval_fraction=0.5"]
    single = _run(args + ["train.batch_size=4", f"run.dir={tmp_path / 'one'}"], 1, command=command)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(args + ["train.batch_size=2", f"run.dir={tmp_path / 'two'}"], 2, command=command)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two if "loss" in r] == [r["step"] for r in one if "loss" in r] == [1, 2, 3]
    for key in keys:
        assert any(key in r for r in one) and any(key in r for r in two), key  # a renamed metric is not "equal"
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5,
                                                                    abs=1e-6), key


def test_resume_at_the_last_step_with_an_open_metrics_window_finishes(tmp_path, pairs_file):
    """Process 0 restores the saved metrics window, the others the same names at zero: their final checkpoint
    sums the same names (a mismatch left the processes in different collectives: a hang)."""
    args = COMMON[:-2] + [f"data.train={pairs_file}", "train.max_steps=4", "train.batch_size=1",
                          "train.log_every=4", "train.save_every=2"]
    killed = _run(args + [f"run.dir={tmp_path / 'run'}"], 2, {"PREFTUNE_FAULT": "after_step:3"})
    assert killed.returncode != 0 and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000002"
    resumed = _run(["--resume", str(tmp_path / "run"), "train.max_steps=2"], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_ppo_on_two_processes_equals_one(tmp_path):
    """Data-parallel PPO: each process samples and scores every other prompt (row-seeded sampling: the same draws as
    one process), the rollout is gathered whole on each (advantages whitened and the KL controlled with global
    statistics), each minibatch is split between the processes with token-weighted losses; per-iteration metrics,
    the policy and the value head equal one process's. Then kill + --resume on 2 processes equals the straight run."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in (
        "the movie was great", "i thought the acting was awful", "this film", "overall a lovely story",
        "the ending was sad", "a plot that")])  # VADER scores that differ: rewards never all zero
    args = ["model=tiny", "train.precision=fp32", "run.plot=false", "ppo.batch_size=6", "ppo.minibatch_size=3",
            "ppo.max_new_tokens=6", "ppo.lr=1e-2", "ppo.scorer=vader", f"ppo.prompts={prompts}", "ppo.iterations=3",
            "ppo.adaptive_kl=true", "ppo.horizon=10", "train.optimizer=sgd", "ppo.save_every=2"]
    single = _run(args + [f"run.dir={tmp_path / 'one'}"], 1, command="ppo")
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(args + [f"run.dir={tmp_path / 'two'}"], 2, command="ppo")
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
                "grad_norm", "completion_tokens"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    assert one[-1]["policy_loss"] != 0 and one[-1]["kl"] != 0  # the policy moved: a wrong update would show
    for name in ("policy/model.safetensors", "value_head.safetensors"):
        wa, wb = (load_file(str(tmp_path / run / name)) for run in ("one", "two"))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5, name
    killed = _run(args + [f"run.dir={tmp_path / 'killed'}"], 2, {"PREFTUNE_FAULT": "after_step:3"}, command="ppo")
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-000002"
    resumed = _run(["--resume", str(tmp_path / "killed")], 2, command="ppo")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["reward"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")] == [r["reward"] for r in two]
    wa, wb = (load_file(str(tmp_path / run / "policy" / "model.safetensors")) for run in ("two", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- FSDP2: sharded instead of replicated
# SGD (no momentum) at a large learning rate: the update is the gradient itself, so a gradient off by the number of
# processes (gloo's AVG for FSDP2, pytorch#162338, or a loss scaled for DDP's averaging) moves the weights and the
# next losses visibly; Adam and RMSprop normalise such a factor away.
SHARDED = ["model=tiny", "train.precision=fp32", "train.progress=false", "run.plot=false", "train.optimizer=sgd",
           "train.lr=0.5", "train.max_steps=3", "train.log_every=1"]


def _sharded_pair(tmp_path, args: list[str], command: str = "dpo", multi_args: tuple[str, ...] = (),
                  sharding: str = "fsdp2"):
    single = _run(args + ["train.batch_size=4", f"run.dir={tmp_path / 'one'}"], 1, command=command)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _run(args + ["train.batch_size=1", "train.grad_accum_steps=2", f"train.sharding={sharding}", *multi_args,
                         f"run.dir={tmp_path / 'two'}"], 2, command=command)
    assert multi.returncode == 0, multi.stderr[-3000:]
    return single, multi


def _assert_same_run(tmp_path, keys, weights: str = "policy/model.safetensors", rel: float = 1e-5) -> None:
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in two if "loss" in r] == [r["step"] for r in one if "loss" in r] == [1, 2, 3]
    for key in keys:
        assert any(key in r for r in one) and any(key in r for r in two), key
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=rel,
                                                                    abs=1e-6), key
    wa, wb = (load_file(str(tmp_path / name / weights)) for name in ("one", "two"))
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5  # the gathered policy: whole, and equal


def _held(stderr: str, what: str, by: str = "FSDP2") -> list[float]:
    return [float(line.split(" holds ")[1].split()[0]) for line in stderr.splitlines()
            if f"of the {what} model's parameters ({by}" in line]


def test_fsdp2_two_processes_equal_one_with_a_sharded_reference(tmp_path, pairs_file):
    """2 sharded processes x (batch 1 x 2 accumulation) = 1 process x batch 4: losses, gradient norms, held-out
    metrics and the gathered policy; the frozen reference is sharded too, each process holding half of it."""
    _, multi = _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}", "data.eval_fraction=0.5"])
    _assert_same_run(tmp_path, ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval/loss",
                                "eval/rewards/margins"))
    for what in ("trained", "frozen"):
        held = _held(multi.stderr, what)
        assert len(held) == 2 and all(0.45 < h <= 0.55 for h in held), (what, held)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert one[1]["loss"] < 0.6  # the step moved the policy: a gradient off by x2 would show in steps 2 and 3


@pytest.mark.parametrize("command, extra, keys, weights", [
    pytest.param("dpo", ("reference.mode=precomputed",), ("loss", "grad_norm", "rewards/margins"),
                 "policy/model.safetensors", marks=pytest.mark.slow),  # the suite's time; DDP's precompute stays
    pytest.param("dpo", ("lora.enabled=true",), ("loss", "grad_norm", "rewards/margins"),
                 "policy-merged/model.safetensors", marks=pytest.mark.slow),  # the adapter reference below trains LoRA
    ("dpo", ("reference.mode=adapter", "data.eval_fraction=0.5"), ("loss", "grad_norm", "rewards/margins", "eval/loss",
                                                                   "eval/rewards/margins"),
     "policy-merged/model.safetensors"),
    # the suite's time: SFT and the reward model on 2 processes stay in make test under DDP
    pytest.param("sft", (), ("loss", "grad_norm", "eval/loss"), "policy/model.safetensors", marks=pytest.mark.slow),
    pytest.param("reward", (), ("loss", "grad_norm", "accuracy", "eval/accuracy"), "reward_model/model.safetensors",
                 marks=pytest.mark.slow),
])
def test_fsdp2_precomputed_sft_and_reward_equal_one_process(tmp_path, pairs_file, command, extra, keys, weights):
    """The same with reference log-probs precomputed (no reference held while training), with a LoRA adapter (the
    frozen base and the adapter in the same units; the adapter and the merged model gathered), with the reference
    as that base with the adapter switched off (its forward through the sharded module, in training and held-out
    evaluation), for SFT (normalised by the global token count) and for the reward model (sharded in place; its
    reward_model/ gathered whole)."""
    held_out = [f"reference.cache_dir={tmp_path / 'cache'}"] if command == "dpo" else ["data.eval_fraction=0.5"]
    _, multi = _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}", *held_out, *extra], command,
                             (f"reference.cache_dir={tmp_path / 'cache-two'}",) if command == "dpo" else ())
    _assert_same_run(tmp_path, keys, weights)
    if "reference.mode=precomputed" in extra:  # the precompute pass: a sharded reference, each process computing half of the pairs
        assert [h for h in _held(multi.stderr, "frozen")] == [0.5, 0.5]
        assert multi.stderr.count(" computed 4 of 8 reference log-probs") == 2


def test_fsdp2_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, pairs_file):
    """Sharded checkpoints (each process its own shards of the weights and AdamW's state): SIGKILL-style exit after
    step 3, --resume from step 2 on 2 processes, and the metrics rows and the gathered policy equal a straight run;
    resuming on another number of processes is refused with a clear error."""
    checkpoint = _straight_and_killed(tmp_path, pairs_file, "fsdp2")
    assert sorted(p.name for p in checkpoint.glob("model.*")) == ["model.rank-0-of-2.safetensors",
                                                                  "model.rank-1-of-2.safetensors"]
    elsewhere = _run(["--resume", str(tmp_path / "killed")], 1)
    assert elsewhere.returncode == 2 and "shards across several processes" in elsewhere.stderr
    _assert_resumed_equals_straight(tmp_path)


def _straight_and_killed(tmp_path, pairs_file, sharding: str, extra: tuple[str, ...] = ()) -> Path:
    """A straight 5-step sharded run (AdamW, accumulation) and one killed after step 3; the killed run's latest
    checkpoint (step 2)."""
    args = SHARDED[:-3] + ["train.optimizer=adamw", "train.lr=1e-2", "train.max_steps=5", "train.log_every=1",
                           "train.save_every=2", f"train.sharding={sharding}", f"data.train={pairs_file}",
                           "train.batch_size=1", "train.grad_accum_steps=2", *extra]
    straight = _run(args + [f"run.dir={tmp_path / 'straight'}"], 2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(args + [f"run.dir={tmp_path / 'killed'}"], 2, {"PREFTUNE_FAULT": "after_step:3"})
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step-000002"
    return tmp_path / "killed" / "checkpoints" / "step-000002"


def _assert_resumed_equals_straight(tmp_path, policy: str = "policy") -> None:
    resumed = _run(["--resume", str(tmp_path / "killed")], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "killed"))
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in b] == [r["loss"] for r in a] and [r["grad_norm"] for r in b] == [
        r["grad_norm"] for r in a]
    wa, wb = (load_file(str(tmp_path / name / policy / "model.safetensors")) for name in ("straight", "killed"))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.slow  # the suite's time: runs with make test-slow
@pytest.mark.parametrize("sharding", ["fsdp2", pytest.param("zero2", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"))])
def test_a_compiled_policy_sharded_equals_one_eager_process(tmp_path, pairs_file, sharding):
    """train.compile=true under FSDP2 (each decoder layer compiled inside its unit) and ZeRO-2 (the decoder):
    2 processes = 1 eager process under SGD (measured with TORCH_LOGS=graph_breaks: none, 2 recompiles)."""
    _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}"], sharding=sharding,
                  multi_args=("train.compile=true",))
    _assert_same_run(tmp_path, ("loss", "grad_norm", "rewards/margins"))


def test_sharding_refuses_what_it_does_not_cover_yet(tmp_path, pairs_file):
    if importlib.util.find_spec("deepspeed") is not None:
        multi = _run(SHARDED + [f"data.train={pairs_file}", "train.sharding=zero3", "train.compile=true",
                                f"run.dir={tmp_path / 'run'}"], 2)
        # each process exits 2 with the message (torchrun itself then reports a failed child)
        assert multi.returncode != 0 and multi.stderr.count("does not support train.compile=true") == 2
        assert "exitcode  : 2" in multi.stderr
    single = _run(SHARDED + [f"data.train={pairs_file}", "train.sharding=fsdp2", f"run.dir={tmp_path / 'one'}"], 1)
    assert single.returncode == 2 and "shards across several processes" in single.stderr
    # an explicit device the processes would not run on (it trained on the CPU and exited 0)
    multi = _run(SHARDED + [f"data.train={pairs_file}", "train.device=cuda:1", f"run.dir={tmp_path / 'dev'}"], 2)
    assert multi.returncode != 0 and multi.stderr.count("config key 'train.device': 'cuda:1' under several") == 2
    assert "Traceback" not in single.stderr


# ---------------------------------------------------------------- DeepSpeed ZeRO (its CPU accelerator, over gloo)
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (make setup installs it)")


@needs_deepspeed
@pytest.mark.slow  # the suite's time (43 s); ZeRO's NaN skip and refusals stay in make test
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_two_processes_equal_one_with_a_partitioned_reference(tmp_path, pairs_file, stage):
    """ZeRO-2 and ZeRO-3 on 2 processes x (batch 1 x 2 accumulation) = 1 process x batch 4 under SGD (a gradient
    off by the number of processes would show): losses, gradient norms (DeepSpeed's own), held-out metrics and the
    policy (ZeRO-3: gathered whole). The reference is a ZeRO-3 inference engine under either stage: each process
    holds half of it; under ZeRO-3 half of the policy too."""
    _, multi = _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}", "data.eval_fraction=0.5"],
                             sharding=stage)
    _assert_same_run(tmp_path, ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval/loss",
                                "eval/rewards/margins"))
    frozen, trained = _held(multi.stderr, "frozen", "DeepSpeed"), _held(multi.stderr, "trained", "DeepSpeed")
    assert len(frozen) == 2 and all(0.45 < h <= 0.55 for h in frozen), frozen
    assert len(trained) == 2 and all((0.45 < h <= 0.55) if stage == "zero3" else h == 1.0 for h in trained), trained
    assert read_metrics(tmp_path / "one" / "metrics.jsonl")[1]["loss"] < 0.6  # the step moved the policy


@needs_deepspeed
@pytest.mark.slow  # the suite's time: runs with make test-slow
@pytest.mark.parametrize("stage, extra", [("zero2", "lora.enabled=true"), ("zero3", "lora.enabled=true"),
                                          ("zero2", "reference.mode=adapter"), ("zero3", "reference.mode=adapter")])
def test_zero_lora_equals_one_process(tmp_path, pairs_file, stage, extra):
    """A LoRA adapter under ZeRO (the frozen base partitioned too under ZeRO-3; DeepSpeed's optimizer over the
    adapter alone) on 2 processes = 1 process under SGD: losses, gradient norms, the adapter and the merged policy;
    with a frozen reference, or the reference as the base with the adapter switched off (gathered through the
    engine)."""
    _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}", extra], sharding=stage)
    _assert_same_run(tmp_path, ("loss", "grad_norm", "rewards/margins"), "policy-merged/model.safetensors")
    _assert_same_run(tmp_path, ("loss",), "policy/adapter_model.safetensors")


@needs_deepspeed
@pytest.mark.slow  # the suite's time: runs with make test-slow
def test_zero3_with_precomputed_reference_log_probs_equals_one_process(tmp_path, pairs_file):
    """The precompute pass on a partitioned reference, each process computing half of the pairs, then ZeRO-3
    training on the cached log-probs. (SFT and the reward model go through the same loop and engine: their
    sharded parity is tested under FSDP2 above.)"""
    _, multi = _sharded_pair(tmp_path, SHARDED + [f"data.train={pairs_file}", f"reference.cache_dir={tmp_path / 'c'}",
                                                  "reference.mode=precomputed"], "dpo",
                             (f"reference.cache_dir={tmp_path / 'c2'}",), sharding="zero3")
    _assert_same_run(tmp_path, ("loss", "grad_norm", "rewards/margins"), rel=5e-5)
    assert _held(multi.stderr, "frozen", "DeepSpeed") == [0.5, 0.5]
    assert multi.stderr.count(" computed 4 of 8 reference log-probs") == 2


@needs_deepspeed
@pytest.mark.slow  # the suite's time: runs with make test-slow
@pytest.mark.parametrize("stage, extra", [("zero2", ()), ("zero3", ()), ("zero3", ("lora.enabled=true",))])
def test_zero_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, pairs_file, stage, extra):
    """preftune's own checkpoints under ZeRO (each process its fp32 partitions and its share of AdamW's state, as
    safetensors; DeepSpeed's own are pickles): killed after step 3, resumed from step 2, equal to a straight run.
    ZeRO-2 has its own restore path (partitions, then an all-gather of the weights). Both run with -m slow, to keep
    the suite's time; a resume under another stage is refused (tests/unit/test_sharding.py)."""
    checkpoint = _straight_and_killed(tmp_path, pairs_file, stage, extra)
    assert sorted(p.name for p in checkpoint.glob("optimizer.*")) == ["optimizer.rank-0-of-2.safetensors",
                                                                      "optimizer.rank-1-of-2.safetensors"]
    _assert_resumed_equals_straight(tmp_path, "policy-merged" if extra else "policy")


@needs_deepspeed
def test_zero_skips_a_nan_step(tmp_path, pairs_file):
    """A NaN loss under ZeRO-2: DeepSpeed's overflow check skips the update, preftune counts it. (What ZeRO does not
    cover is refused before anything loads: tests/unit/test_sharding.py.)"""
    nan = _run(SHARDED + [f"data.train={pairs_file}", "train.sharding=zero2", "train.batch_size=2",
                          f"run.dir={tmp_path / 'nan'}"], 2, {"PREFTUNE_FAULT": "nan_loss:2"})
    assert nan.returncode == 0, nan.stderr[-3000:]
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 1] and "loss" not in rows[1]
    weights = load_file(str(tmp_path / "nan" / "policy" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
