"""`preftune bench`: the correctness gate against TRL on `tiny`, and a tiny end-to-end run of the benchmark."""

import json
import statistics

import pytest

pytest.importorskip("trl")

from preftune.benchmark.gate import GATE_RECORDS, GateError, compare, run_gate  # noqa: E402
from preftune.cli import main  # noqa: E402


def test_gate_preftune_and_trl_agree_on_logps_and_loss():
    result = run_gate(tolerance=1e-4)
    assert result["passed"] and result["tokens_identical"]
    assert result["n_pairs"] == len(GATE_RECORDS)
    assert result["max_abs_diff_policy_logps"] <= 1e-4
    assert result["max_abs_diff_ref_logps"] <= 1e-4
    assert result["abs_diff_loss"] <= 1e-4
    # policy (seed 0) != reference (seed 1): the loss is not trivially log 2, so agreeing on it means something
    assert abs(result["loss_preftune"] - 0.6931472) > 1e-3


def test_gate_fails_loudly_on_a_disagreement():
    import torch

    ours = {"ids": [[[1], [2, 3], [4]]], "policy": torch.tensor([-5.0, -6.0]), "ref": torch.tensor([-5.0, -6.0]),
            "loss": 0.69, "grad_norm": 1.0}
    theirs = {**ours, "policy": torch.tensor([-5.0, -6.01]), "logged_chosen_mean": -5.0}
    with pytest.raises(GateError, match="max_abs_diff_policy_logps"):
        compare(ours, theirs, 1e-4)
    with pytest.raises(GateError, match="tokenisations differ"):
        compare(ours, {**theirs, "ids": [[[1], [2, 3, 5], [4]]]}, 1e-4)


def test_bench_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--workloads", "tiny-cpu", "--warmup-steps", "1", "--steps", "2", "--precision", "fp32",
                 "--skip-gate", "--out", str(out), "--preftune", "train.gradient_checkpointing=true",
                 "--peak-tflops", "0.05"])
    assert code == 0
    rows = json.loads(out.read_text())  # the file is the list of rows (the format) ...
    assert isinstance(rows, list)
    doc = json.loads((tmp_path / "bench.summary.json").read_text())  # ... and the rest beside it
    assert set(doc) == {"meta", "gate", "summary", "ratios", "limits"}
    assert [r["system"] for r in rows] == ["preftune", "trl-default", "trl-best"]
    for r in rows:
        assert r["workload"] == "tiny-cpu" and r["error"] is None
        assert len(r["step_s_list"]) == 2 and r["step_s"] == pytest.approx(statistics.median(r["step_s_list"]))
        assert r["pairs_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"])
        assert r["peak_mem_gb"] > 0.1 and r["precision"] == "fp32" and r["step_cpu_s"] > 0
        assert r["tokens_match_preftune"]  # TRL tokenised the records exactly as preftune did
        # MFU, the accounting: policy tokens/s x 8N (live reference) / peak; N counts the tied embedding once
        assert r["n_params"] == 3_219_776 and r["flops_per_token"] == 8 * 3_219_776
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * 8 * 3_219_776 / 0.05e12)
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"] == rows[2]["tokens_per_step"]
    assert rows[0]["settings"]["gradient_checkpointing"] is True  # --preftune reached the preftune child only
    phases = rows[0]["phase_s"]  # preftune's step-time breakdown over the timed steps
    assert set(phases) == {"data", "forward", "backward", "optimizer"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= rows[0]["step_s_max"] * 1.01
    assert rows[1]["phase_s"] is None
    assert rows[1]["settings"]["effective"]["gradient_checkpointing"] == "True"  # TRL's default
    assert rows[2]["settings"]["effective"]["gradient_checkpointing"] == "False"  # trl-best
    by_system = {s["system"]: s for s in doc["summary"]}
    fastest = min(("trl-default", "trl-best"), key=lambda s: by_system[s]["step_s"])
    assert [(r["workload"], r["baseline"]) for r in doc["ratios"]] == [
        ("tiny-cpu", "trl-default"), ("tiny-cpu", "trl-best"), ("tiny-cpu", f"trl-fastest ({fastest})")]
    for r in doc["ratios"]:
        baseline = fastest if r["baseline"].startswith("trl-fastest") else r["baseline"]
        for metric in ("pairs_per_s", "tokens_per_s", "peak_mem_gb", "step_s"):
            assert r[metric] == pytest.approx(by_system["preftune"][metric] / by_system[baseline][metric])
    assert all(s["mfu"] == pytest.approx(s["tokens_per_s"] * 8 * 3_219_776 / 0.05e12) for s in doc["summary"])
    assert doc["meta"]["peak_tflops"] == 0.05
    # the step's limit on this machine (matmuls at the step's shapes, attention, the optimizer's memory traffic)
    limit = doc["limits"]["tiny-cpu"]
    parts = ("body_matmuls_s", "head_matmuls_s", "attention_s", "optimizer_s")
    assert limit["limit_s"] == pytest.approx(sum(limit[k] for k in parts)) and all(limit[k] > 0 for k in parts)
    assert limit["step_over_limit"] == pytest.approx(by_system["preftune"]["step_s"] / limit["limit_s"])
    assert limit["layout"] == rows[0]["settings"]["layout"] and limit["bandwidth_gb_s"] > 0.1
    memory, n = limit["memory_gb"], 3_219_776  # fp32, RMSprop, a live fp32 reference: 4 bytes a parameter each
    assert memory["weights"] == memory["gradients"] == memory["optimizer_state"] == memory["reference"] == round(
        4 * n / 2**30, 3)
    assert 0.2 < memory["runtime"] < by_system["preftune"]["peak_mem_gb"]
    assert sum(memory.values()) == pytest.approx(by_system["preftune"]["peak_mem_gb"], abs=0.01)
    printed = capsys.readouterr().out
    assert "preftune / TRL" in printed and "MFU" in printed and "x the limit" in printed


def test_bench_rejects_a_bad_preftune_override(capsys):
    assert main(["bench", "--workloads", "tiny-cpu", "--skip-gate", "--preftune", "train.layuot=packed"]) == 2
    assert "train.layuot" in capsys.readouterr().err


@pytest.mark.slow  # the suite's time: runs with make test-slow
def test_bench_precomputed_reference_mode_reaches_both_systems(tmp_path):
    """--reference precomputed: preftune runs reference.mode=precomputed and TRL precompute_ref_log_probs=True
    (the one-off pass comes before the first, untimed step for both)."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--workloads", "tiny-cpu", "--systems", "preftune,trl-best", "--warmup-steps", "1",
                 "--steps", "1", "--precision", "fp32", "--skip-gate", "--reference", "precomputed",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["error"] for r in rows] == [None, None]
    assert [r["mfu"] for r in rows] == [None, None]  # no peak known for a CPU without --peak-tflops
    assert rows[0]["flops_per_token"] == 6 * rows[0]["n_params"]  # no reference forward in the step
    assert "reference.mode=precomputed" in rows[0]["settings"]["overrides"]
    assert rows[1]["settings"]["effective"]["precompute_ref_log_probs"] == "True"


def test_step_clock_reports_the_training_steps_gpu_peak(monkeypatch):
    """On CUDA the peak statistics are reset once, after the first step: the reported peak is what the training
    steps hold, the peak with model loading is kept beside it (CUDA calls faked: this machine has none)."""
    import torch

    from preftune.benchmark.systems import StepClock

    allocated = iter([5.0, 3.0, 3.5])  # GiB: load + step 1, then two steady steps
    resets = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(allocated) * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(True))
    clock = StepClock(cuda=True)
    try:
        for _ in range(3):
            clock._stamp(None, (), {})
    finally:
        clock.close()
    assert resets == [True] and clock.gpu_gb == [5.0, 3.0, 3.5]
    assert (clock.gpu_gb[-1], max(clock.gpu_gb)) == (3.5, 5.0)  # peak_gpu_gb, peak_gpu_gb_with_load


def test_bench_writes_the_rows_after_every_child(tmp_path, monkeypatch):
    """A run stopped part-way (a device's time limit) keeps the rows of the children that finished."""
    from preftune.benchmark import runner

    calls = []

    def child(job, root, timeout_s):
        calls.append(job["system"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the time limit strikes during the second child
        return {"error": "first child failed on purpose"}

    monkeypatch.setattr(runner, "_child", child)
    out = tmp_path / "bench.json"
    assert main(["bench", "--workloads", "tiny-cpu", "--skip-gate", "--precision", "fp32", "--out", str(out)]) == 130
    rows = json.loads(out.read_text())
    assert [(r["system"], r["error"]) for r in rows] == [("preftune", "first child failed on purpose")]


def _installed(name: str) -> bool:
    from preftune.benchmark.allocator import allocator_library

    try:
        return allocator_library(name) is not None
    except ValueError:
        return False


@pytest.mark.slow  # the suite's time (20 s); the refusals and the recorded allocator stay in make test
@pytest.mark.skipif(not _installed("tcmalloc"), reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
def test_bench_preloads_the_asked_allocator_in_every_child(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--workloads", "tiny-cpu", "--systems", "preftune,trl-best", "--warmup-steps", "1",
                 "--steps", "1", "--precision", "fp32", "--skip-gate", "--allocator", "tcmalloc",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["error"], r["allocator"]) for r in rows] == [(None, "tcmalloc")] * 2  # each child checked its own maps
    assert json.loads((tmp_path / "bench.summary.json").read_text())["meta"]["settings"]["allocator"] == "tcmalloc"
    assert "tcmalloc preloaded in every child" in capsys.readouterr().out


def test_bench_allocator_errors_and_the_childs_own_check(monkeypatch, capsys):
    from preftune.benchmark import allocator
    from preftune.train.rundir import loaded_allocator

    assert loaded_allocator() == "system" and allocator.check_loaded("system") == "system"
    with pytest.raises(RuntimeError, match="asked for the jemalloc allocator, but this process runs with system"):
        allocator.check_loaded("jemalloc")  # a child whose preload did not take stops before its first step
    unchanged = {"LD_PRELOAD": "x.so"}
    assert allocator.preload_env(allocator.allocator_library("system"), unchanged) == unchanged
    if _installed("jemalloc"):
        library = allocator.allocator_library("jemalloc")
        assert allocator.preload_env(library, {"LD_PRELOAD": "x.so"})["LD_PRELOAD"].endswith(" x.so")
    # not installed: a clear error before any child runs (exit 2), with how to install it
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert main(["bench", "--workloads", "tiny-cpu", "--skip-gate", "--allocator", "jemalloc"]) == 2
    assert "no libjemalloc on this machine (Debian/Ubuntu: apt install libjemalloc2" in capsys.readouterr().err
