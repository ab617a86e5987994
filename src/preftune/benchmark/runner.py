"""Run the benchmark: gate, then for each workload each system in its own child process, interleaved.

Per workload the systems run in the given order (preftune, trl-default, trl-best); with ``repeat`` > 1 every
other repetition runs them in reverse, so a slow drift of the machine (other load, heat) does not favour one
system. Each child is a fresh interpreter: its peak RSS is its own, and no allocator or thread state carries over.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from preftune.benchmark.allocator import allocator_library, preload_env
from preftune.benchmark.flops import count_parameters, flops_per_token, gpu_peak_tflops, mfu
from preftune.benchmark.limit import format_limit, workload_limit
from preftune.benchmark.systems import SYSTEMS
from preftune.benchmark.workloads import WORKLOADS, Workload

METRICS = ("pairs_per_s", "tokens_per_s", "peak_mem_gb", "step_s")


@dataclass
class Settings:
    """Matched across systems (see systems.matched_overrides and systems.trl_args)."""

    optimizer: str = "rmsprop"
    lr: float = 5e-6
    beta: float = 0.1
    max_grad_norm: float = 10.0
    precision: str = "auto"  # auto: bf16 on GPUs and on CPUs with native bf16, else fp32 (preftune's rule)
    seed: int = 0
    # model: a live frozen reference in every step; precomputed: reference log-probs computed in one pass before
    # training by both (preftune reference.mode=precomputed, TRL precompute_ref_log_probs=True), outside the timing
    reference: str = "model"
    preftune_overrides: list[str] = field(default_factory=list)  # extra config for the preftune system only
    allocator: str = "system"  # system (glibc's malloc, or whatever LD_PRELOAD already holds) | tcmalloc | jemalloc


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16"
    from preftune.train.runtime import cpu_has_fast_bf16

    return "bf16" if cpu_has_fast_bf16() else "fp32"


def hardware() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from preftune.train.runtime import cpu_has_fast_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_fast_bf16(), "gpu": gpu,
            "gpu_peak_bf16_tflops": gpu_peak_tflops(gpu),
            "platform": platform.platform(), "python": platform.python_version()}


def _child(job: dict, root: Path, timeout_s: float) -> dict:
    """Run one system on one workload in a fresh interpreter; returns its result or {"error": ...}."""
    job_path = root / f"job-{job['workload']}-{job['system']}-{job['rep']}.json"
    result_path = job_path.with_suffix(".result.json")
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore"}
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # preftune picks CUDA whenever it sees one
    env = preload_env(job.get("preload"), env)  # every system alike (benchmark/allocator.py)
    try:
        proc = subprocess.run([sys.executable, "-m", "preftune.benchmark.systems", str(job_path), str(result_path)],
                              capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode != 0 or not result_path.is_file():
        tail = proc.stderr.strip().splitlines()[-15:]
        oom = any("OutOfMemoryError" in line or "out of memory" in line for line in tail)
        return {"error": ("out of memory: " if oom else "") + "\n".join(tail), "oom": oom}
    return json.loads(result_path.read_text(encoding="utf-8"))


def cpu_busy(window_s: float = 2.0) -> float:
    """Fraction of the machine's CPU time that was busy over the next ``window_s`` (from /proc/stat): while the
    parent waits, that is other processes' load."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(max_busy: float | None, log, max_wait_s: float = 900) -> float | None:
    """On a shared machine: wait (at most ``max_wait_s``) until other processes use under ``max_busy`` of the
    CPUs; returns the last busy fraction seen (None when not asked or /proc/stat is missing)."""
    if max_busy is None or not Path("/proc/stat").is_file():
        return None
    start, busy = time.monotonic(), cpu_busy()
    while busy >= max_busy and time.monotonic() - start < max_wait_s:
        busy = cpu_busy(5.0)
    if busy >= max_busy:
        log(f"  (CPUs still {busy:.0%} busy after {max_wait_s:.0f} s: measuring anyway)")
    return busy


def make_row(workload: Workload, system: str, rep: int, job: dict, result: dict) -> dict:
    """One child's measurements. ``step_s`` is the MEDIAN timed step (robust to a step disturbed by other
    processes on a shared machine); pairs/s and tokens/s derive from it; the mean and every step are kept."""
    row = {"workload": workload.name, "system": system, "rep": rep, "device": workload.device,
           "model": workload.model, "precision": job["precision"], "pairs_per_step": workload.n_pairs,
           "prompt_tokens_mean": job["prompt_tokens_mean"], "response_tokens_mean": job["response_tokens_mean"],
           "warmup_steps": job["warmup_steps"], "timed_steps": job["timed_steps"]}
    if "error" in result:
        return {**row, **dict.fromkeys(METRICS), "mfu": None, "error": result["error"],
                "oom": result.get("oom", False)}
    steps = result["step_s_list"]
    step_s = statistics.median(steps)
    peak = result["peak_gpu_gb"] if workload.device == "cuda" else result["peak_rss_gb"]
    tokens_per_s = result["tokens_per_step"] / step_s
    return {**row, "pairs_per_s": workload.n_pairs / step_s, "tokens_per_s": tokens_per_s,
            "peak_mem_gb": peak, "mfu": mfu(tokens_per_s, job["flops_per_token"], job["peak_tflops"]),
            "n_params": job["n_params"], "flops_per_token": job["flops_per_token"],
            "step_s": step_s, "step_s_mean": statistics.fmean(steps),
            "step_s_min": min(steps), "step_s_max": max(steps), "step_s_list": steps,
            "step_cpu_s": statistics.median(result["step_cpu_s_list"]), "step_cpu_s_list": result["step_cpu_s_list"],
            "step_minflt": statistics.median(result["step_minflt_list"]),
            "peak_rss_gb": result["peak_rss_gb"], "peak_gpu_gb": result["peak_gpu_gb"],
            "peak_gpu_gb_with_load": result.get("peak_gpu_gb_with_load"),
            "tokens_per_step": result["tokens_per_step"],
            "completion_tokens_per_step": job["completion_tokens_per_step"],
            "tokens_match_preftune": result.get("tokens_match", True),
            "phase_s": result.get("phase_s"),  # preftune's step-time breakdown (data/forward/backward/optimizer)
            "limit": result.get("limit"), "runtime_rss_gb": result.get("runtime_rss_gb"),  # preftune: the limit
            "until_first_timed_step_s": result["until_first_timed_step_s"], "torch_threads": result["torch_threads"],
            "settings": result["settings"], "versions": result["versions"], "peak_tflops": job["peak_tflops"],
            "allocator": result.get("allocator"), "error": None}


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (workload, system), pooling repetitions: step_s = median over all timed steps of all reps,
    peak memory = the largest peak, MFU from the pooled tokens/s."""
    out = []
    for workload, system in dict.fromkeys((r["workload"], r["system"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["system"]) == (workload, system) and not r["error"]]
        if not group:
            out.append({"workload": workload, "system": system, "reps": 0, **dict.fromkeys(METRICS),
                        "mfu": None, "step_s_min": None, "step_cpu_s": None})
            continue
        steps = [s for r in group for s in r["step_s_list"]]
        step_s = statistics.median(steps)
        tokens_per_s = group[0]["tokens_per_step"] / step_s
        out.append({"workload": workload, "system": system, "reps": len(group),
                    "pairs_per_s": group[0]["pairs_per_step"] / step_s, "tokens_per_s": tokens_per_s,
                    "mfu": mfu(tokens_per_s, group[0]["flops_per_token"], group[0]["peak_tflops"]),
                    "peak_mem_gb": max(r["peak_mem_gb"] for r in group), "step_s": step_s, "step_s_min": min(steps),
                    "step_cpu_s": statistics.median([s for r in group for s in r["step_cpu_s_list"]])})
    return out


def ratios(summary: list[dict]) -> list[dict]:
    """preftune / TRL for every metric (> 1 means preftune has more of it: faster for pairs/s and tokens/s,
    more memory for peak_mem_gb, slower for step_s), against each TRL system and against ``trl-fastest``: per
    workload whichever TRL system had the shortest step (TRL's best setting is not the same everywhere)."""
    out = []
    by_key = {(s["workload"], s["system"]): s for s in summary}
    for workload in dict.fromkeys(s["workload"] for s in summary):
        ours = by_key.get((workload, "preftune"))
        theirs = [s for s in summary if s["workload"] == workload and s["system"] != "preftune"]
        if ours is None or not theirs:
            continue
        timed = [s for s in theirs if s["step_s"]]
        if len(timed) > 1:
            fastest = min(timed, key=lambda s: s["step_s"])
            theirs.append({**fastest, "system": f"trl-fastest ({fastest['system']})"})
        for t in theirs:
            ratio = {m: (ours[m] / t[m] if ours[m] is not None and t[m] else None) for m in METRICS}
            out.append({"workload": workload, "baseline": t["system"], **ratio})
    return out


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_table(summary: list[dict], ratio_rows: list[dict], limits: dict | None = None) -> str:
    show_mfu = any(s.get("mfu") is not None for s in summary)
    lines = [f"{'workload':22} {'system':12} {'step_s':>8} {'pairs/s':>8} {'tokens/s':>9} {'peak_mem_GB':>11} "
             f"{'min_step_s':>10} {'cpu_s/step':>10}" + (f" {'MFU':>6}" if show_mfu else "")]
    for s in summary:
        lines.append(f"{s['workload']:22} {s['system']:12} {_fmt(s['step_s'], '8.3f')} "
                     f"{_fmt(s['pairs_per_s'], '8.2f')} {_fmt(s['tokens_per_s'], '9.0f')} "
                     f"{_fmt(s['peak_mem_gb'], '11.2f')} {_fmt(s['step_s_min'], '10.3f')} "
                     f"{_fmt(s['step_cpu_s'], '10.2f')}" + (f" {_fmt(s.get('mfu'), '6.1%')}" if show_mfu else ""))
    if ratio_rows:
        lines += ["", "preftune / TRL (pairs/s, tokens/s: >1 = preftune faster; peak_mem: <1 = preftune smaller)",
                  f"{'workload':22} {'vs':28} {'pairs/s':>8} {'tokens/s':>9} {'peak_mem':>9} {'step_s':>8}"]
        for r in ratio_rows:
            lines.append(f"{r['workload']:22} {r['baseline']:28} {_fmt(r['pairs_per_s'], '8.2f')} "
                         f"{_fmt(r['tokens_per_s'], '9.2f')} {_fmt(r['peak_mem_gb'], '9.2f')} "
                         f"{_fmt(r['step_s'], '8.2f')}")
    for workload, limit in (limits or {}).items():
        lines += ["", f"{workload}: preftune's step against this machine's limit (bench/README.md, 'The limit'):",
                  "  " + format_limit(limit)]
    return "\n".join(lines)


def prepare_workload(workload: Workload, root: Path) -> dict:
    """Model directory, data file and preftune's token counts for one workload (done once, in the parent)."""
    from preftune.benchmark.workloads import make_records, prepare_model, sequence_budget, tokenize_records, write_jsonl
    from preftune.models.load import load_tokenizer

    model_dir = prepare_model(workload.model, root)
    tokenizer = load_tokenizer(model_dir)
    records = make_records(tokenizer, workload)
    tokens = tokenize_records(tokenizer, records, workload)
    max_length, max_prompt = sequence_budget(workload)
    data = write_jsonl(root / f"{workload.name}.jsonl", records)
    return {"model_dir": model_dir, "n_params": count_parameters(model_dir), "data": str(data),
            "max_length": max_length, "max_prompt_tokens": max_prompt,
            "n_pairs": workload.n_pairs, "device": workload.device, "preftune_ids": tokens.pop("ids"), **tokens}


def _run_workload(w: Workload, systems: list[str], base: dict, root: Path, repeat: int, timeout_s: float,
                  wait_busy: float | None, log, rows: list[dict], on_row) -> None:
    """Every system on one workload, ``repeat`` times, alternating the order; appends one row per child to
    ``rows`` and calls ``on_row(rows)`` after each."""
    for rep in range(repeat):
        for system in (systems if rep % 2 == 0 else systems[::-1]):
            job = {**base, "system": system, "rep": rep, "out_dir": str(root / f"{w.name}-{system}-{rep}")}
            busy = wait_quiet(wait_busy, log)
            t0, load_before = time.perf_counter(), os.getloadavg()[0]
            row = make_row(w, system, rep, job, _child(job, root, timeout_s))
            # other processes on the machine: a 1-minute load average above the core count means contention
            row.update(load_avg_1m=[load_before, os.getloadavg()[0]], cpu_busy_before=busy)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            if row["error"]:
                shown = f"failed: {row['error'].splitlines()[-1] if row['error'].strip() else ''}"
            else:
                shown = (f"{row['step_s']:.3f} s/step  {row['pairs_per_s']:.2f} pairs/s  "
                         f"{row['tokens_per_s']:.0f} tokens/s  peak {row['peak_mem_gb']:.2f} GB")
                if row.get("phase_s"):
                    shown += "  [" + " ".join(f"{k} {v:.3f}" for k, v in row["phase_s"].items()) + "]"
                if row.get("allocator") not in (None, "system"):
                    shown += f"  ({row['allocator']})"
            log(f"  {system:12} {shown}  (child {time.perf_counter() - t0:.0f} s, load {load_before:.1f})")


def run_benchmark(*, workloads: list[str], systems: list[str], settings: Settings, quick: bool, repeat: int = 1,
                  steps: tuple[int | None, int | None] = (None, None), gate: bool = True, timeout_s: float = 1800,
                  wait_busy: float | None = None, peak_tflops: float | None = None, log=print, on_row=None) -> dict:
    """Everything ``preftune bench`` does but the printing of the final table; returns the JSON document.
    ``on_row(rows)`` is called after every child (the CLI writes the rows so far: a run cut short keeps them)."""
    unknown = [s for s in systems if s not in SYSTEMS] + [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown system or workload: {', '.join(unknown)} (systems: {', '.join(SYSTEMS)}; "
                         f"workloads: {', '.join(WORKLOADS)})")
    preload = allocator_library(settings.allocator)  # ValueError (exit 2) before anything runs if not installed
    if (steps[0] is not None and steps[0] < 1) or (steps[1] is not None and steps[1] < 1) or repeat < 1:
        raise ValueError("--warmup-steps, --steps and --repeat must be >= 1 (a step is timed from the end of the "
                         "previous one)")
    started = time.time()
    hw = hardware()
    doc: dict = {"meta": {"command": " ".join(["preftune", *sys.argv[1:]]) if sys.argv else "", "quick": quick,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hw, "peak_tflops": peak_tflops,
                          "settings": vars(settings), "repeat": repeat, "systems": systems, "workloads": workloads},
                 "gate": None}
    if gate:
        from preftune.benchmark.gate import run_gate

        doc["gate"] = run_gate()
        log(f"gate passed on tiny: max |Δ log-prob| policy {doc['gate']['max_abs_diff_policy_logps']:.2e}, "
            f"reference {doc['gate']['max_abs_diff_ref_logps']:.2e}, |Δ loss| {doc['gate']['abs_diff_loss']:.2e}")
    rows, limits = [], {}
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        root = Path(tmp)
        for name in workloads:
            w = WORKLOADS[name]
            warm, timed = (w.warmup_steps, w.timed_steps)
            if quick:
                warm, timed = w.quick or (w.warmup_steps, min(w.timed_steps, 3))
            warm, timed = steps[0] or warm, steps[1] or timed
            prepared = prepare_workload(w, root)
            precision = resolve_precision(settings.precision, w.device)
            # MFU against the bf16 peak: --peak-tflops, else the GPU's data-sheet peak (bf16 runs on a GPU only)
            peak = peak_tflops or (hw["gpu_peak_bf16_tflops"] if w.device == "cuda" and precision == "bf16" else None)
            base = {**prepared, **vars(settings), "preload": preload, "precision": precision, "workload": name,
                    "warmup_steps": warm, "timed_steps": timed, "peak_tflops": peak,
                    "flops_per_token": flops_per_token(prepared["n_params"], settings.reference)}
            log(f"{name}: {w.model}, {w.n_pairs} pairs/step, prompt {prepared['prompt_tokens_mean']:.0f} + response "
                f"{prepared['response_tokens_mean']:.0f} tokens, {prepared['tokens_per_step']} tokens/step, "
                f"{base['precision']}, {warm} warm-up + {timed} timed steps"
                + ("" if settings.allocator == "system" else f", {settings.allocator} preloaded in every child"))
            _run_workload(w, systems, base, root, repeat, timeout_s, wait_busy, log, rows, on_row)
            ours = [r for r in rows if r["workload"] == name and r["system"] == "preftune" and not r["error"]]
            limit = ours and workload_limit(base, ours[0], aggregate(ours)[0]["step_s"],
                                            max(r["peak_rss_gb"] for r in ours))
            if limit:
                limits[name] = limit
                log(f"  limit: {format_limit(limit)}")
    summary = aggregate(rows)
    doc.update(rows=rows, summary=summary, ratios=ratios(summary), limits=limits)
    doc["meta"]["wall_s"] = time.time() - started
    return doc
