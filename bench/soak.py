"""Soak: one long `preftune dpo` run on the `tiny` model, watched from outside for leaks (resident memory, open file
descriptors, threads) and for checkpoint retention (never more than ``train.keep_checkpoints`` directories).

    python bench/soak.py                                  # 2,000 steps, writes bench/results/soak-YYYYMMDD.json
    python bench/soak.py --steps 300 --every 50 --out /tmp/soak.json

The run is the real CLI in a child process (``python -m preftune.cli dpo``; this checkout's ``src`` first on its
PYTHONPATH): fp32, batch 2, one intra-op thread, a synthetic pairs file and a held-out eval file written here, an
evaluation and a checkpoint every ``--every`` steps, ``train.keep_checkpoints=2``. Every ``--interval`` seconds
(0.5) the parent reads the child's ``/proc/PID/status`` (VmRSS, VmHWM, Threads) and ``/proc/PID/fd``, and the step
it has reached from the tail of ``RUN/metrics.jsonl`` (one row per step). ``RUN/checkpoints`` is watched with
inotify as well, so a directory that exists for a millisecond between two samples is still counted (``exact``).

Reported: RSS / FDs / threads at the first ``--every`` step, the quarters and the end; their growth from the first
``--every`` step to the end (two points, and a least-squares slope over all samples between them, per 1,000 steps);
the peak; ``checkpoints/step-*`` at the end and the most ever present; leftover ``checkpoints/.tmp-*``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_Q_OVERFLOW = 0x40, 0x80, 0x100, 0x200, 0x4000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name, len bytes)


def make_pairs(path: Path, n: int, start: int = 0) -> None:
    """Deterministic arithmetic Q&A pairs of varied length (the right sum chosen, a wrong one rejected)."""
    rows = []
    for i in range(start, start + n):
        a, b = i * 7 % 97, i * 13 % 89
        pad = " please" * (i % 5)
        rows.append({"prompt": f"Question {i}:{pad} what is {a} plus {b}?",
                     "chosen": f" {a} plus {b} is {a + b}." + " That is certain." * (i % 3),
                     "rejected": f" I think it is {a * b % 150}, maybe." + " Not sure." * (i % 4)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def proc_sample(pid: int) -> dict | None:
    """VmRSS, VmHWM (kB), Threads and the open descriptors of a live process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed between the listing and the readlink
                pass
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: exited, not yet reaped
        return None
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "hwm_kb": int(fields["VmHWM"].split()[0]),
            "threads": int(fields["Threads"]), "fds": fds}


class MetricsTail:
    """The highest step logged so far in metrics.jsonl, reading only what was appended since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.step = path, 0, 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.step
        whole = chunk[:chunk.rfind(b"\n") + 1]  # a row still being written is read next time
        self.offset += len(whole)
        for line in whole.splitlines():
            if line.strip():
                self.step = max(self.step, int(json.loads(line).get("step", 0)))
        return self.step


class CheckpointWatch(threading.Thread):
    """Every ``step-*`` and ``.tmp-*`` directory that appears in or leaves RUN/checkpoints, from inotify events in
    the order the kernel reports them, so the most ever present at once is exact, however briefly."""

    def __init__(self, run_dir: Path, keep: int):
        super().__init__(daemon=True)
        self.run_dir, self.root, self.keep = run_dir, run_dir / "checkpoints", keep
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.run_wd = self._watch(run_dir, IN_CREATE)
        self.root_wd = None
        self.steps: set[str] = set()
        self.tmps: set[str] = set()
        self.max_steps = self.max_tmps = 0
        self.over: list[dict] = []  # each moment step-* exceeded keep: when (s) and which directories
        self.overflowed = False
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def _watch(self, path: Path, mask: int) -> int:
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        return wd

    def _start_root(self) -> None:
        self.root_wd = self._watch(self.root, IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO)
        for p in self.root.iterdir():  # whatever appeared before the watch was in place
            self._change(p.name, True)

    def _change(self, name: str, present: bool) -> None:
        names = self.steps if name.startswith("step-") else self.tmps if name.startswith(".tmp-") else None
        if names is None:
            return
        names.add(name) if present else names.discard(name)
        self.max_steps, self.max_tmps = max(self.max_steps, len(self.steps)), max(self.max_tmps, len(self.tmps))
        if present and name.startswith("step-") and len(self.steps) > self.keep:
            self.over.append({"t_s": round(time.monotonic() - self.t0, 3), "dirs": sorted(self.steps)})

    def run(self) -> None:
        while not self.done.is_set():
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            data = os.read(self.fd, 1 << 16)
            for off in iter_events(data):
                wd, mask, _, size = EVENT.unpack_from(data, off)
                name = data[off + EVENT.size: off + EVENT.size + size].rstrip(b"\0").decode()
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                elif wd == self.run_wd and name == "checkpoints" and self.root_wd is None:
                    self._start_root()
                elif wd == self.root_wd:
                    self._change(name, bool(mask & (IN_CREATE | IN_MOVED_TO)))

    def stop(self) -> None:
        self.done.set()
        self.join()
        os.close(self.fd)


def iter_events(data: bytes):
    off = 0
    while off < len(data):
        yield off
        off += EVENT.size + EVENT.unpack_from(data, off)[3]


def checkpoint_dirs(run_dir: Path) -> tuple[list[str], list[str]]:
    root = run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [n for n in names if n.startswith("step-")], [n for n in names if n.startswith(".tmp-")]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Model name", "unknown").strip()


def soak(args: argparse.Namespace, tmp: Path) -> dict:
    train, held_out, run_dir = tmp / "pairs.jsonl", tmp / "eval.jsonl", tmp / "run"
    make_pairs(train, args.pairs)
    make_pairs(held_out, 32, start=10_000)
    run_dir.mkdir()  # empty: the run takes it; created here so the watch sees `checkpoints` appear
    cmd = [sys.executable, "-m", "preftune.cli", "dpo", "model=tiny", "train.precision=fp32",
           f"data.train={train}", f"data.eval={held_out}", "train.batch_size=2", f"train.max_steps={args.steps}",
           f"train.eval_every={args.every}", f"train.save_every={args.every}",
           f"train.keep_checkpoints={args.keep}", f"train.num_threads={args.threads}", "train.progress=false",
           "run.plot=false", f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                      os.environ.get("PYTHONPATH")])))
    watch = CheckpointWatch(run_dir, args.keep)
    watch.start()
    tail = MetricsTail(run_dir / "metrics.jsonl")
    samples, hwm_kb = [], 0
    load_start = os.getloadavg()
    with open(tmp / "child.log", "wb") as log:
        t0 = time.monotonic()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while child.poll() is None:
            s = proc_sample(child.pid)
            if s is not None:
                step = tail.poll()
                steps, tmps = checkpoint_dirs(run_dir)
                samples.append({"t_s": round(time.monotonic() - t0, 2), "step": step, "rss_kb": s["rss_kb"],
                                "fds": len(s["fds"]), "threads": s["threads"], "ckpts": len(steps),
                                "tmps": len(tmps), "fd_targets": s["fds"]})
                hwm_kb = s["hwm_kb"]
            time.sleep(args.interval)
        wall_s = time.monotonic() - t0
    watch.stop()
    log_tail = (tmp / "child.log").read_text(errors="replace")[-3000:]
    if child.returncode != 0:
        sys.exit(f"the run failed (exit {child.returncode}):\n{log_tail}")
    steps_end, tmps_end = checkpoint_dirs(run_dir)
    return {"cmd": cmd, "samples": samples, "hwm_kb": hwm_kb, "wall_s": wall_s,
            "steps_end": steps_end, "tmps_end": tmps_end, "watch": watch, "load": [load_start, os.getloadavg()],
            "last_step": tail.poll()}


def at_step(samples: list[dict], step: int) -> dict | None:
    """The first sample taken once the run had logged ``step``."""
    return next((s for s in samples if s["step"] >= step), None)


def slope_per_1000(samples: list[dict], key: str) -> float | None:
    xs, ys = [s["step"] for s in samples], [s[key] for s in samples]
    if len(xs) < 2 or max(xs) == min(xs):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(args: argparse.Namespace, r: dict, tmp: Path) -> dict:
    samples, mb = r["samples"], 1 / 1024
    # training: up to the last sample before the final step was logged; after it the run evaluates, writes its last
    # checkpoint and the policy, and exits (one-off costs, reported apart so they do not read as growth)
    done = next((i for i, s in enumerate(samples) if s["step"] >= args.steps), len(samples))
    training, after = samples[:done], samples[done:]
    marks = sorted({args.every, args.steps // 4, args.steps // 2, 3 * args.steps // 4} - {0})
    picked = [(m, at_step(training, m)) for m in marks] + [(args.steps, training[-1] if training else None)]
    milestones = [{"step": m, "sampled_at_step": s["step"], "t_s": s["t_s"], "rss_mb": round(s["rss_kb"] * mb, 1),
                   "fds": s["fds"], "threads": s["threads"], "checkpoints": s["ckpts"]} for m, s in picked if s]
    first, last = at_step(training, args.every), picked[-1][1]
    span = (last["step"] - first["step"]) if first and last else 0
    growth = {}
    if span > 0:
        per = 1000 / span
        between = training[training.index(first):]
        windows = _windows(between, args.every)
        growth = {"from_step": first["step"], "to_step": last["step"],
                  "rss_mb": round((last["rss_kb"] - first["rss_kb"]) * mb, 2),
                  "rss_mb_per_1000_steps": round((last["rss_kb"] - first["rss_kb"]) * mb * per, 2),
                  "rss_mb_per_1000_steps_fit": round(slope_per_1000(between, "rss_kb") * mb, 2),
                  "rss_min_max_mb": [round(min(s["rss_kb"] for s in between) * mb, 1),
                                     round(max(s["rss_kb"] for s in between) * mb, 1)],
                  "rss_windows_columns": ["from_step", "samples", "min_mb", "median_mb", "max_mb"],
                  "rss_windows": windows,
                  "rss_window_median_mb": round(windows[-1][3] - windows[0][3], 2),
                  "rss_window_median_mb_per_1000_steps": round((windows[-1][3] - windows[0][3]) * 1000
                                                               / max(1, windows[-1][0] - windows[0][0]), 2),
                  "fds": last["fds"] - first["fds"], "fds_per_1000_steps": round((last["fds"] - first["fds"]) * per, 2),
                  "fds_min_max": [min(s["fds"] for s in between), max(s["fds"] for s in between)],
                  "threads": last["threads"] - first["threads"],
                  "threads_min_max": [min(s["threads"] for s in between), max(s["threads"] for s in between)]}
        start_fds, end_fds = first["fd_targets"], last["fd_targets"]
        growth["new_fd_targets"] = sorted(set(end_fds.values()) - set(start_fds.values()))
        growth["fd_targets_start"] = sorted(t.replace(str(tmp), "<tmp>") for t in start_fds.values())
        growth["fd_targets_end"] = sorted(t.replace(str(tmp), "<tmp>") for t in end_fds.values())
    peak = max(samples, key=lambda s: s["rss_kb"])
    watch = r["watch"]
    import torch

    return {
        "meta": {"command": "python bench/soak.py " + " ".join(sys.argv[1:]), "run": r["cmd"][1:],
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch.__version__, "git": _git(),
                 "settings": {"steps": args.steps, "every": args.every, "keep_checkpoints": args.keep,
                              "batch_size": 2, "num_threads": args.threads, "train_pairs": args.pairs,
                              "eval_pairs": 32, "interval_s": args.interval},
                 "loadavg_start_end": [[round(x, 2) for x in la] for la in r["load"]],
                 "wall_s": round(r["wall_s"], 1), "last_logged_step": r["last_step"], "n_samples": len(samples)},
        "milestones": milestones,
        "growth": growth,
        "peak": {"rss_mb_sampled": round(peak["rss_kb"] * mb, 1), "at_step": peak["step"],
                 "vm_hwm_mb": round(r["hwm_kb"] * mb, 1),
                 "training_peak_rss_mb": round(max(s["rss_kb"] for s in training) * mb, 1) if training else None},
        "after_training": {"what": "final evaluation, final checkpoint, RUN/policy, exit", "n_samples": len(after),
                           "peak_rss_mb": round(max(s["rss_kb"] for s in after) * mb, 1) if after else None,
                           "last_rss_mb": round(after[-1]["rss_kb"] * mb, 1) if after else None,
                           "last_fds": after[-1]["fds"] if after else None},
        "checkpoints": {"keep": args.keep, "at_end": r["steps_end"], "count_at_end": len(r["steps_end"]),
                        "max_sampled": max(s["ckpts"] for s in samples), "max_exact": watch.max_steps,
                        "exact_complete": not watch.overflowed, "over_keep_events": len(watch.over),
                        "over_keep_first": watch.over[:3], "tmp_left_at_end": r["tmps_end"],
                        "max_tmp_sampled": max(s["tmps"] for s in samples), "max_tmp_exact": watch.max_tmps},
        "samples_columns": ["t_s", "step", "rss_kb", "fds", "threads", "ckpts", "tmps"],
        "samples": [[s["t_s"], s["step"], s["rss_kb"], s["fds"], s["threads"], s["ckpts"], s["tmps"]]
                    for s in samples],
    }


def _windows(samples: list[dict], every: int) -> list[list[float]]:
    """[first step, samples, min, median, max RSS (MB)] for each ``every``-step window: the median is what a leak
    raises whatever phase (step, evaluation, checkpoint) a single sample happened to catch."""
    windows: dict[int, list[int]] = {}
    for s in samples:
        windows.setdefault(s["step"] // every * every, []).append(s["rss_kb"])
    return [[k, len(v), round(min(v) / 1024, 1), round(statistics.median(v) / 1024, 1), round(max(v) / 1024, 1)]
            for k, v in sorted(windows.items())]


def _git() -> str | None:
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or None


def print_table(doc: dict) -> None:
    g, p, c, meta = doc["growth"], doc["peak"], doc["checkpoints"], doc["meta"]
    every = meta["settings"]["every"]
    medians = {w[0]: w[3] for w in g.get("rss_windows", [])}
    print(f"{'step':>6} {'RSS MB':>8} {'window median':>14} {'FDs':>5} {'threads':>8} {'ckpts':>6}")
    for m in doc["milestones"]:
        median = medians.get(m["sampled_at_step"] // every * every, float("nan"))
        print(f"{m['sampled_at_step']:>6} {m['rss_mb']:>8.1f} {median:>14.1f} {m['fds']:>5} {m['threads']:>8} "
              f"{m['checkpoints']:>6}")
    if g:
        print(f"growth {g['from_step']} -> {g['to_step']}: RSS {g['rss_mb']:+.1f} MB ({g['rss_mb_per_1000_steps']:+.1f} "
              f"MB / 1000 steps; least-squares {g['rss_mb_per_1000_steps_fit']:+.1f}; first to last window's median "
              f"{g['rss_window_median_mb']:+.1f}), FDs {g['fds']:+d} (range "
              f"{g['fds_min_max'][0]}-{g['fds_min_max'][1]}), threads {g['threads']:+d}")
    a = doc["after_training"]
    print(f"peak RSS {p['rss_mb_sampled']:.1f} MB sampled (step {p['at_step']}), VmHWM {p['vm_hwm_mb']:.1f} MB; "
          f"while training {p['training_peak_rss_mb']} MB; after the last step (final eval, checkpoint, policy) "
          f"peak {a['peak_rss_mb']} MB, last {a['last_rss_mb']} MB, {a['last_fds']} FDs")
    print(f"checkpoints (keep {c['keep']}): {c['count_at_end']} at the end ({', '.join(c['at_end'])}); most present: "
          f"{c['max_sampled']} sampled, {c['max_exact']} exact (inotify), over keep {c['over_keep_events']} times; "
          f".tmp-* left {len(c['tmp_left_at_end'])}, most present {c['max_tmp_exact']}")
    print(f"wall {meta['wall_s']:.0f} s, {meta['n_samples']} samples; CPU {meta['cpu']} ({meta['cpu_count']} cores, "
          f"load {meta['loadavg_start_end'][0][0]} -> {meta['loadavg_start_end'][1][0]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100, help="train.eval_every and train.save_every")
    parser.add_argument("--keep", type=int, default=2, help="train.keep_checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="train.num_threads")
    parser.add_argument("--pairs", type=int, default=256, help="synthetic training pairs (the run loops over them)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / f"soak-{time.strftime('%Y%m%d')}.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="preftune-soak-") as tmp:
        doc = report(args, soak(args, Path(tmp)), Path(tmp))
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print_table(doc)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
