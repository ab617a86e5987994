"""Nothing lost under faults, each injected for real: SIGTERM and SIGINT (real signals to the real handlers), a
second SIGINT during a checkpoint write, a NaN loss (a real NaN through the backward), and checkpoints whose bytes
were cut or altered on disk. Where the run continues, ``--resume`` equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.train.rundir import read_metrics

from conftest import PAIRS, write_jsonl

COMMON = ["model=tiny", "train.precision=fp32", "train.progress=false", "run.plot=false", "train.lr=1e-3",
          "train.optimizer=adamw", "train.num_threads=1"]


def _cli(args, fault: str | None = None, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``preftune ARGS`` in a subprocess; ``fault``: PREFTUNE_FAULT; ``max_file_bytes``: the process may not write
    a file larger than that (RLIMIT_FSIZE: the kernel fails the write with EFBIG, as a full disk fails it with
    ENOSPC)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PREFTUNE_FAULT", None)
    if fault:
        env["PREFTUNE_FAULT"] = fault

    def limit():
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "preftune.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, preexec_fn=limit)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "policy" / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    """Same final weights (bit for bit) and the same metrics rows (loss, accuracy, margins, grad norm)."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]  # no duplicated or missing steps
    for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "train/skipped_steps"):
        assert [r.get(key) for r in ma] == pytest.approx([r.get(key) for r in mb], abs=1e-7), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(the arguments of an 8-step DPO run checkpointing every 2 steps, its uninterrupted run directory): one run
    for the module, which every test compares its interrupted and resumed run with."""
    root = tmp_path_factory.mktemp("straight")
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    args = COMMON + [f"data.train={pairs}", "train.max_steps=8", "train.batch_size=2", "train.save_every=2",
                     "train.log_every=1"]
    done = _cli(["dpo", *args, f"run.dir={root / 'straight'}"])
    assert done.returncode == 0, done.stderr[-2000:]
    return args, root / "straight"


@pytest.fixture(scope="module")
def killed(straight, tmp_path_factory):
    """The straight run's twin killed with SIGKILL after step 5: checkpoints of steps 2 and 4, its pid left in the
    lock file. Each test works on a copy (:func:`_copy`)."""
    args, _ = straight
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    assert _cli(["dpo", *args, f"run.dir={run_dir}"], fault="after_step:5").returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("sig", ["sigterm", "sigint"])
def test_signal_finishes_the_step_checkpoints_and_resume_equals_uninterrupted(tmp_path, straight, sig):
    args, reference = straight
    run_dir = tmp_path / sig
    stopped = _cli(["dpo", *args, f"run.dir={run_dir}"], fault=f"{sig}:5")  # after step 5: no save_every there
    code = {"sigterm": 128 + signal.SIGTERM, "sigint": 128 + signal.SIGINT}[sig]
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert f"stopped by {sig.upper()} after step 5" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000005"  # written on the way out
    assert not (run_dir / "policy").exists()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    if sig == "sigterm":  # the same stop either way: resumed once
        assert main(["dpo", "--resume", str(run_dir)]) == 0  # in this process: no interpreter start
        _assert_same_run(reference, run_dir)


def test_sigterm_from_outside_stops_cleanly(tmp_path, pairs_file):
    """A signal sent by another process (as a scheduler does) while the run trains: a checkpoint at the step it
    stopped after, the metrics up to that step, exit status 143."""
    run_dir = tmp_path / "run"
    args = COMMON + [f"data.train={pairs_file}", "train.max_steps=100000", "train.batch_size=2", "train.log_every=1",
                     f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "dpo", *args], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(run_dir / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    step = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert f"after step {step}" in err


def test_second_sigint_during_the_checkpoint_aborts_and_keeps_the_previous_one(tmp_path, straight):
    """SIGINT after step 5 asks for a checkpoint; a second SIGINT half-way through writing it aborts at once. The
    half-written checkpoint never takes its name, the one of step 4 stays the latest, and resuming from it equals
    the uninterrupted run."""
    args, reference = straight
    run_dir = tmp_path / "run"
    aborted = _cli(["dpo", *args, f"run.dir={run_dir}"], fault="sigint:5,sigint_mid_save:5")
    assert aborted.returncode == 130, aborted.stderr[-2000:]
    assert "Traceback" not in aborted.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not (run_dir / "checkpoints" / "step-000005").exists()
    assert main(["dpo", "--resume", str(run_dir)]) == 0  # in this process: no interpreter start
    _assert_same_run(reference, run_dir)


def test_a_nan_loss_skips_the_step_and_counts_it(tmp_path, pairs_file, monkeypatch, caplog):
    """A NaN at step 3 of 3: no update (the weights equal a 2-step run's), counted, warned about; the run goes on."""
    args = COMMON + [f"data.train={pairs_file}", "train.batch_size=2", "train.log_every=1"]
    assert main(["dpo", *args, "train.max_steps=2", f"run.dir={tmp_path / 'two'}"]) == 0
    monkeypatch.setenv("PREFTUNE_FAULT", "nan_loss:3")
    with caplog.at_level("WARNING", logger="preftune"):
        assert main(["dpo", *args, "train.max_steps=3", f"run.dir={tmp_path / 'nan'}"]) == 0
    assert "step 3 skipped: the loss or the gradient is not finite" in caplog.text
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "nan")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1]
    assert "loss" not in rows[-1] and all(r["loss"] == r["loss"] for r in rows[:2])  # no NaN in any mean


def test_a_loss_that_stays_nan_stops_the_run_with_the_last_checkpoint_intact(tmp_path, pairs_file):
    run_dir = tmp_path / "run"
    args = COMMON + [f"data.train={pairs_file}", "train.batch_size=2", "train.max_steps=20", "train.save_every=2",
                     "train.max_skipped_steps=2", f"run.dir={run_dir}"]
    stopped = _cli(["dpo", *args], fault="nan_loss:3+")
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    assert "3 steps in a row had a non-finite loss or gradient" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (run_dir / "policy").exists()
    # the checkpoint of step 4 holds step 2's weights (steps 3 and 4 were skipped); it verifies and loads
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 2
    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":  # a failed copy: the tail is gone
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a flipped byte: same size, different content
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,file", [("truncate", "model.safetensors"), ("alter", "optimizer.safetensors")])
def test_a_corrupted_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, straight, killed, how, file):
    _, reference = straight
    run_dir = _copy(killed, tmp_path)
    _corrupt(run_dir / "checkpoints" / "step-000004" / file, how)
    resumed = _cli(["dpo", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-000004'} is corrupt: {file}" in resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'step-000002'} instead" in resumed.stderr
    _assert_same_run(reference, run_dir)


def test_no_trustworthy_checkpoint_is_a_clear_error(tmp_path, killed, capsys):
    run_dir = _copy(killed, tmp_path)
    for step in ("step-000002", "step-000004"):
        _corrupt(run_dir / "checkpoints" / step / "model.safetensors", "truncate")
    assert main(["dpo", "--resume", str(run_dir)]) == 2
    assert "no checkpoint can be trusted" in capsys.readouterr().err


def test_a_second_writer_is_refused_with_the_first_ones_pid_and_host(tmp_path, pairs_file, capsys):
    import socket

    run_dir = tmp_path / "run"
    args = COMMON + [f"data.train={pairs_file}", "train.batch_size=2", "train.log_every=1", f"run.dir={run_dir}"]
    first = subprocess.Popen([sys.executable, "-m", "preftune.cli", "dpo", *args, "train.max_steps=100000"],
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(run_dir / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.05)
        for second in (["dpo", *args, "train.max_steps=2"], ["dpo", "--resume", str(run_dir)]):
            assert main(second) == 2  # in this process: the lock is the kernel's, whoever asks
            assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}" in \
                capsys.readouterr().err
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # only the first run's rows, none mixed in


def test_a_killed_runs_lock_is_taken_over_on_resume(tmp_path, straight, killed):
    _, reference = straight
    run_dir = _copy(killed, tmp_path)
    assert '"pid"' in (run_dir / ".lock").read_text()  # the killed run's pid is still in it
    resumed = _cli(["dpo", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "took over the lock left by a run that is no longer running (pid" in resumed.stderr
    assert (run_dir / ".lock").read_text() == ""  # a run that ends normally leaves no owner behind
    _assert_same_run(reference, run_dir)


def test_a_run_dir_holding_a_run_is_refused_or_replaced_never_mixed(tmp_path, pairs_file, capsys):
    run_dir = tmp_path / "run"
    args = COMMON + [f"data.train={pairs_file}", "train.batch_size=2", "train.max_steps=2", f"run.dir={run_dir}"]
    assert main(["dpo", *args]) == 0
    before = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["dpo", *args, "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"run.dir {run_dir} already holds a run (metrics.jsonl, checkpoints, policy)" in err
    assert f"--resume {run_dir}" in err and "run.overwrite=true" in err
    assert (run_dir / "metrics.jsonl").read_text() == before  # untouched
    assert main(["dpo", *args, "train.max_steps=3", "run.overwrite=true"]) == 0
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000003"]


@pytest.mark.parametrize("args,message", [
    (["dpo", "train.lr=-1"], "config key 'train.lr' must be >= 0, got -1"),
    (["dpo", "train.max_skipped_steps=-2"], "config key 'train.max_skipped_steps' must be >= 0"),
    (["dpo", "train.num_threads=0"], "config key 'train.num_threads' must be >= 1"),
    (["dpo", "data.limit=-1"], "config key 'data.limit' must be >= 1"),
    (["dpo", "lora.dropout=5"], "config key 'lora.dropout' must be in [0, 1), got 5"),
    (["dpo", "run.dir={file}"], "run.dir {file} is a file, not a directory"),
    # a typo in an alias: no minute of hub retries, the aliases named and the likely one suggested
    (["dpo", "model=smollm2-135"], "is not an alias (smollm2-135m, tiny)"),
    (["dpo", "model=smollm2-135"], "did you mean 'smollm2-135m'?"),
    (["score", "{pairs}", "--scorer", "nope"], "unknown scorer 'nope'; choose one of: sentiment, vader, rm:PATH"),
])
def test_bad_settings_are_one_line_errors(tmp_path, pairs_file, args, message, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    command, *rest = [a.format(file=file, pairs=pairs_file) for a in args]
    extra = [] if command == "score" else [*COMMON, f"data.train={pairs_file}", f"run.dir={tmp_path / 'run'}"]
    assert main([command, *extra, *rest]) == 2  # in this process: any exception but the CLI's own would escape
    assert message.format(file=file) in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_is_named_and_the_previous_one_stays(tmp_path, straight, killed):
    """A real write failure (the kernel refuses a file past RLIMIT_FSIZE, between the weights' size and the
    optimizer state's): the run stops with the checkpoint's path and the cause, exit status 74; the previous
    checkpoint stays the latest and verifies, nothing half-written is left, and resuming equals the straight run."""
    from preftune.train.checkpoint import checkpoint_problem

    _, reference = straight
    run_dir = _copy(killed, tmp_path)
    previous = run_dir / "checkpoints" / "step-000004"
    weights, optimizer = ((previous / name).stat().st_size for name in ("model.safetensors", "optimizer.safetensors"))
    assert optimizer > 1.5 * weights  # AdamW: two moments per weight
    failed = _cli(["dpo", "--resume", str(run_dir)], max_file_bytes=(weights + optimizer) // 2)
    assert failed.returncode == 74, failed.stderr[-2000:]
    assert f"error: cannot write checkpoint {run_dir / 'checkpoints' / 'step-000006'}: File too large" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert checkpoint_problem(previous) is None
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000004"]
    assert main(["dpo", "--resume", str(run_dir)]) == 0  # in this process: no interpreter start
    _assert_same_run(reference, run_dir)


def test_metrics_that_cannot_be_written_keep_every_whole_row(tmp_path, straight):
    """metrics.jsonl may not grow past a limit the config and env files fit under: the row that crosses it fails,
    is named with the cause (exit 74), and is cut back, so the file holds whole rows only."""
    args, reference = straight
    run_dir = tmp_path / "run"
    r1, r2, r3 = (len(line) + 1 for line in (reference / "metrics.jsonl").read_text().splitlines()[:3])
    limit = r1 + r2 + r3 // 2  # two rows and half a third (their timings vary by a few characters)
    assert (reference / "config.yaml").stat().st_size < limit and (reference / "env.json").stat().st_size < limit
    failed = _cli(["dpo", *args, "train.save_every=0", f"run.dir={run_dir}"], max_file_bytes=limit)
    assert failed.returncode == 74, failed.stderr[-2000:]
    assert f"error: cannot write metrics {run_dir / 'metrics.jsonl'}: File too large" in failed.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")  # parses: no half row at the end
    assert [r["step"] for r in rows] == [1, 2]
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")


def _in_a_mount_namespace(tmp_path: Path, mount_options: str, args: list[str]) -> tuple[int, str, Path]:
    """``preftune ARGS`` in a private mount namespace (``unshare -rm``: no privileges needed where user namespaces
    are allowed) with a tmpfs mounted at ``tmp_path/disk`` (``mount_options``: its size, ``ro``); the run directory
    it leaves there is copied out before the namespace goes. (exit status, stderr, the copy)."""
    import shutil

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespaces here (unshare -rm); the RLIMIT_FSIZE tests cover write failures")
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    command = " ".join(["exec", sys.executable, "-m", "preftune.cli", *args])
    script = (f'mount -t tmpfs -o {mount_options} tmpfs "{disk}" || exit 99\n'
              f'({command}) 2> "{tmp_path}/stderr"; code=$?\n'
              f'if [ -d "{disk}/run" ]; then cp -a "{disk}/run" "{copy}"; fi\n'
              f'exit $code\n')
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PREFTUNE_FAULT", None)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode != 99, f"mounting a tmpfs failed: {done.stderr}"
    return done.returncode, (tmp_path / "stderr").read_text(), copy


def test_a_full_disk_fails_the_checkpoint_cleanly_and_the_previous_one_resumes(tmp_path, pairs_file):
    """A real full disk (a 32 MB tmpfs; each checkpoint of `tiny` under SGD holds 13 MB of weights, and the
    third is written before the oldest is pruned): ENOSPC is named with the path, exit 74; the checkpoint of step
    4 stays the latest and verifies, and resuming it on a disk with room equals an uninterrupted run."""
    from preftune.train.checkpoint import checkpoint_problem

    args = [*COMMON, "train.optimizer=sgd", f"data.train={pairs_file}", "train.batch_size=2", "train.max_steps=8",
            "train.save_every=2", "train.log_every=1"]
    code, err, copy = _in_a_mount_namespace(tmp_path, "size=32m", ["dpo", *args, f"run.dir={tmp_path}/disk/run"])
    assert code == 74, err[-2000:]
    assert "error: cannot write checkpoint" in err and "step-000006: No space left on device" in err
    assert "Traceback" not in err
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert checkpoint_problem(copy / "checkpoints" / "step-000004") is None
    assert not list((copy / "checkpoints").glob(".tmp-*"))
    assert main(["dpo", *args, f"run.dir={tmp_path / 'straight'}"]) == 0
    assert main(["dpo", "--resume", str(copy)]) == 0  # in this process: no interpreter start
    _assert_same_run(tmp_path / "straight", copy)


def test_a_read_only_run_dir_is_a_one_line_error(tmp_path, pairs_file):
    code, err, _ = _in_a_mount_namespace(tmp_path, "ro,size=1m", ["dpo", *COMMON, f"data.train={pairs_file}",
                                                                   f"run.dir={tmp_path}/disk/run"])
    assert code == 2, err[-2000:]
    assert f"error: run.dir {tmp_path}/disk/run cannot be created: Read-only file system" in err
    assert "Traceback" not in err


def test_sampling_stopped_by_sigterm_leaves_no_partial_output(tmp_path):
    """`preftune sample` writes its output atomically: stopped at any moment, the output file is absent (or, if it
    finished first, whole); never a truncated file presented as the result."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review number {i}:"} for i in range(600)])
    out = tmp_path / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "preftune.cli", "sample", "tiny", "--prompts", str(prompts),
                             "--out", str(out), "--max-new-tokens", "48", "--batch-size", "16"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        time.sleep(8)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:
        proc.kill()
    if proc.returncode == 0:  # it finished before the signal: then the file is whole
        assert len(out.read_text().splitlines()) == 600
    else:
        assert proc.returncode == -signal.SIGTERM and not out.exists()


def test_resuming_a_finished_run_adds_nothing(tmp_path, pairs_file):
    """--resume of a run that already reached train.max_steps: no step, no second final evaluation, no row and no
    checkpoint are added; the policy stays the same."""
    run_dir = tmp_path / "run"
    assert main(["dpo", *COMMON, f"data.train={pairs_file}", "data.eval_fraction=0.5", "train.max_steps=2",
                 "train.batch_size=2", f"run.dir={run_dir}"]) == 0

    def files():
        return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
                if p.is_file() and p.name not in ("config.yaml", ".lock", "training.png")}

    before = files()
    assert any("eval/loss" in r for r in read_metrics(run_dir / "metrics.jsonl"))
    assert main(["dpo", "--resume", str(run_dir)]) == 0
    after = files()
    assert after.keys() == before.keys()
    assert after[Path("metrics.jsonl")] == before[Path("metrics.jsonl")]  # no second eval row
    assert after[Path("policy/model.safetensors")] == before[Path("policy/model.safetensors")]


def test_a_sampling_output_that_cannot_be_written_is_named(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review {i}:"} for i in range(40)])
    out = tmp_path / "samples.jsonl"
    failed = _cli(["sample", "tiny", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8"],
                  max_file_bytes=1000)  # a few rows' worth
    assert failed.returncode == 74, failed.stderr[-2000:]
    assert f"error: cannot write output {out}: File too large" in failed.stderr and "Traceback" not in failed.stderr
    assert not out.exists() and not list(tmp_path.glob(".samples.jsonl.*"))  # no partial file, no temporary left
