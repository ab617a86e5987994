"""``preftune bench``: preftune against TRL's DPOTrainer, side by side (imports nothing heavy until it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

TESTED_TRL = ("1.16", "2")  # DPOTrainer internals the gate relies on were read in TRL 1.16

DESCRIPTION = """\
Run preftune and TRL's DPOTrainer on the same model, data, batch size, sequence lengths, precision and optimizer
(same lr, beta, max_grad_norm), each system in its own child process, interleaved; time several steps after
warm-up and print pairs/s, policy tokens/s (non-padding tokens of the chosen + rejected sequences), peak memory
(RSS on CPU, max allocated on GPU) and the preftune/TRL ratios. A correctness gate runs first: on the tiny
model both must give the same per-sequence log-probs and DPO loss (to 1e-4), or the benchmark stops.

systems: preftune | trl-default (TRL's defaults apart from the matched settings) | trl-best (gradient
checkpointing off, no logging, no progress bar). --reference precomputed: both precompute the reference log-probs.
Needs TRL: pip install 'preftune[bench]'."""


def register(subparsers) -> None:
    from preftune.benchmark.allocator import ALLOCATORS
    from preftune.benchmark.systems import SYSTEMS

    p = subparsers.add_parser("bench", help="benchmark against TRL's DPOTrainer, side by side",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="cpu-short only, 2 warm-up + 3 timed steps (< 3 min on 2 cores)")
    p.add_argument("--out", metavar="FILE.json", help="write the list of rows (one per workload and system: workload, "
                   "system, pairs_per_s, tokens_per_s, peak_mem_gb, step times, ...) to FILE.json, and the settings, "
                   "the gate's result, the per-system summary and the ratios to FILE.summary.json")
    p.add_argument("--workloads", help="comma-separated (default: the CPU workloads, or the GPU ones when CUDA is "
                                       "available): cpu-short, cpu-long-prompt, gpu-0.4b-short, gpu-0.4b-2k, "
                                       "gpu-1.5b-short, gpu-1.5b-2k, gpu-1.5b-long-prompt")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated (default {','.join(SYSTEMS)})")
    p.add_argument("--steps", type=int, help="timed steps per run (default: per workload)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first, at least 1 (default: per workload)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions; odd ones run the systems in reverse order")
    p.add_argument("--optimizer", choices=("rmsprop", "adamw"), default="rmsprop",
                   help="same for all (default rmsprop)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="same for all; auto: bf16 autocast on GPUs and CPUs with native bf16, else fp32")
    p.add_argument("--reference", choices=("model", "precomputed"), default="model",
                   help="same for all: a live frozen reference (default), or reference log-probs precomputed in "
                        "one pass before the timed steps (preftune reference.mode=precomputed, TRL "
                        "precompute_ref_log_probs=True)")
    p.add_argument("--preftune", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config for the preftune system only, repeatable (e.g. train.layout=packed, "
                        "train.gradient_checkpointing=true, train.compile=true); recorded in the JSON")
    p.add_argument("--allocator", choices=tuple(ALLOCATORS), default="system",
                   help="the memory allocator of every child, all systems alike: system (glibc's malloc, or what "
                        "LD_PRELOAD already holds; default), or tcmalloc / jemalloc preloaded (must be installed, e.g. "
                        "apt install libtcmalloc-minimal4); recorded in every row")
    p.add_argument("--wait-quiet", type=float, metavar="FRACTION",
                   help="shared machines: before each child, wait (up to 15 min) until other processes keep less "
                        "than FRACTION of the CPUs busy (e.g. 0.2)")
    p.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                   help="the hardware's peak (TFLOP/s) for the MFU column: policy tokens/s x 8N (6N with "
                        "--reference precomputed) / peak; default: the GPU's dense bf16 data-sheet peak (H100, "
                        "H200, A100, ...) for bf16 GPU workloads, none on CPUs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process (default 1800)")
    p.add_argument("--skip-gate", action="store_true", help=argparse.SUPPRESS)  # tests: the gate has its own
    p.set_defaults(func=cmd_bench)


def summary_path(out: Path) -> Path:
    """FILE.json -> FILE.summary.json (beside the rows)."""
    return out.with_name(out.name.removesuffix(".json") + ".summary.json")


def cmd_bench(args) -> int:
    import json
    import sys


    try:
        import trl
    except ImportError:
        print("error: preftune bench needs TRL: pip install 'preftune[bench]'", file=sys.stderr)
        return 2
    from packaging.version import Version

    if not Version(TESTED_TRL[0]) <= Version(trl.__version__) < Version(TESTED_TRL[1]):
        print(f"warning: TRL {trl.__version__}: the gate reads DPOTrainer internals (compute_ref_log_probs, the fused "
              f"LM head, _metrics) checked against TRL >={TESTED_TRL[0]},<{TESTED_TRL[1]}", file=sys.stderr)
    import torch

    from preftune.benchmark.gate import GateError
    from preftune.benchmark.runner import Settings, format_table, run_benchmark
    from preftune.benchmark.workloads import default_workloads

    cuda = torch.cuda.is_available()
    workloads = args.workloads.split(",") if args.workloads else default_workloads(args.quick, cuda)
    from preftune.config import ConfigError, load_config

    try:
        load_config(None, args.preftune)  # a typo'd key fails here, not in a child after the model preparation
    except ConfigError as exc:
        print(f"error: --preftune: {exc}", file=sys.stderr)
        return 2
    settings = Settings(optimizer=args.optimizer, precision=args.precision, reference=args.reference,
                        preftune_overrides=args.preftune, allocator=args.allocator)
    out = Path(args.out) if args.out else None

    def write_rows(rows: list[dict]) -> None:  # after every child: a run stopped by a time limit keeps its rows
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        tmp.replace(out)

    try:
        doc = run_benchmark(workloads=workloads, systems=args.systems.split(","), settings=settings, quick=args.quick,
                            repeat=args.repeat, steps=(args.warmup_steps, args.steps), gate=not args.skip_gate,
                            timeout_s=args.timeout, wait_busy=args.wait_quiet, peak_tflops=args.peak_tflops,
                            log=lambda m: print(m, flush=True), on_row=write_rows if out else None)
    except GateError as exc:
        print(f"\nCORRECTNESS GATE FAILED: preftune and TRL do not compute the same thing; no timing was run.\n{exc}",
              file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(doc["summary"], doc["ratios"], doc.get("limits")))
    if out:
        write_rows(doc["rows"])
        summary = summary_path(out)
        summary.write_text(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2), encoding="utf-8")
        print(f"\nwrote {out} (rows) and {summary} (settings, gate, summary, ratios)")
    failed = [r for r in doc["rows"] if r["error"] and not r.get("oom")]
    for r in failed:
        print(f"error: {r['workload']} / {r['system']} failed:\n{r['error']}", file=sys.stderr)
    return 1 if failed else 0
