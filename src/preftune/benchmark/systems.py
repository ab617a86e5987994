"""What one benchmark child process runs: one system on one workload, timed step by step.

    python -m preftune.benchmark.systems JOB.json RESULT.json

Timing is the same for every system: a global optimizer post-step hook (``torch.optim.optimizer.
register_optimizer_step_post_hook``) stamps the end of each optimizer step, after a device synchronise. The time of
step k is stamp(k) - stamp(k-1): a whole iteration (data and collate, forward, backward, clipping, optimizer,
logging), never model loading or data preparation. The first ``warmup_steps`` are not timed. The same hook records
the process CPU time (all threads; a view less sensitive to other processes on a shared machine), minor page
faults (fresh memory the kernel had to zero-fill), and peak memory: the RSS high-water mark of this process
(``resource.getrusage``; it includes loading both models) and, on CUDA, ``torch.cuda.max_memory_allocated`` over
the steps after the first (the peak statistics are reset there, so the reported peak is what training holds, not
a loading transient such as a reference converted to bf16 after loading in fp32; the whole process's peak is
kept as ``peak_gpu_gb_with_load``).

Systems:
- ``preftune``: the real ``preftune dpo`` recipe (``recipes.dpo.run``) (config overrides only). The final checkpoint and policy save are replaced by
  no-ops here: they come after the timed steps and TRL runs with ``save_strategy="no"``.
- ``trl-default``: ``DPOTrainer`` with TRL's defaults apart from the matched settings (``trl_args``).
- ``trl-best``: the same plus TRL's fastest-looking single-device settings (``TRL_BEST``). Measured on CPU with
  long prompts, gradient checkpointing OFF is slower for TRL; the runner's ratios therefore also compare against
  ``trl-fastest``, the faster TRL system per workload.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

SYSTEMS = ("preftune", "trl-default", "trl-best")

# TRL settings beyond the matched ones. Chosen for speed on one CPU or GPU:
# - gradient checkpointing off (TRL turns it on by default: it recomputes the forward in the backward);
# - no logging, no progress bar (TRL's per-step metric bookkeeping in _compute_loss cannot be switched off);
# - precompute_ref_log_probs is not a "best" setting but a workload: it follows the benchmark's --reference for
#   every system (off by default: a live reference forward in every timed step).
# bf16 autocast is part of the matched precision (TRL's own default is bf16=True).
TRL_BEST = {"gradient_checkpointing": False, "logging_strategy": "no", "disable_tqdm": True}


class StepClock:
    """Stamps (time, peak RSS, peak GPU memory) at the end of every optimizer step of any torch optimizer."""

    def __init__(self, cuda: bool):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.cuda = cuda
        self.times: list[float] = []
        self.cpu_s: list[float] = []  # process CPU time (all threads): less sensitive to other load than wall time
        self.minflt: list[int] = []  # minor page faults: fresh memory touched (allocator returning/refetching pages)
        self.rss_gb: list[float] = []
        self.gpu_gb: list[float] = []
        self._handle = register_optimizer_step_post_hook(self._stamp)

    def _stamp(self, optimizer, args, kwargs) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.gpu_gb.append(torch.cuda.max_memory_allocated() / 2**30)
            if len(self.gpu_gb) == 1:  # later peaks: the training steps' own, not model loading's transients
                torch.cuda.reset_peak_memory_stats()
        self.times.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s.append(usage.ru_utime + usage.ru_stime)
        self.minflt.append(usage.ru_minflt)
        self.rss_gb.append(usage.ru_maxrss / 2**20)  # KiB on Linux

    def close(self) -> None:
        self._handle.remove()


def matched_overrides(job: dict) -> list[str]:
    """preftune config overrides that fix what both systems share."""
    return [f"model={job['model_dir']}", f"data.train={job['data']}", f"data.max_length={job['max_length']}",
            f"data.max_prompt_tokens={job['max_prompt_tokens']}", f"train.batch_size={job['n_pairs']}",
            f"train.max_steps={job['warmup_steps'] + job['timed_steps']}", f"train.lr={job['lr']}",
            f"train.optimizer={job['optimizer']}", f"train.max_grad_norm={job['max_grad_norm']}",
            "train.warmup_steps=0", "train.schedule=constant", f"train.precision={job['precision']}",
            f"train.seed={job['seed']}", f"dpo.beta={job['beta']}", "dpo.loss=sigmoid",
            f"reference.mode={job.get('reference', 'model')}"]


def _measured_limit(job: dict, cfg, layout: str) -> dict | None:
    """After the timed steps, once per workload (the runner reads the first repetition's): the step's matrix
    products etc. alone on this machine; none where the limit does not model the step, or cannot be measured."""
    import torch
    from transformers import AutoConfig

    from preftune.benchmark.limit import step_batches, step_limit, unmodelled
    from preftune.train.objectives import loss_from_config
    from preftune.train.policy import resolve_reference_mode

    unmodelled_here = unmodelled(cfg)
    if unmodelled_here:
        print(f"the step's limit is not measured under {', '.join(unmodelled_here)}: it models full fine-tuning "
              "with a reference of its own, precomputed or none", file=sys.stderr)
        return None
    live_reference = resolve_reference_mode(cfg, loss_from_config(cfg)) == "model"  # not precomputed, not loss-free
    try:  # the step's measurements stand without it
        return step_limit(AutoConfig.from_pretrained(job["model_dir"]), step_batches(job), layout,
                          reference=live_reference, precision=job["precision"], optimizer=job["optimizer"],
                          n_params=job["n_params"], threads=torch.get_num_threads(),
                          recompute=cfg.train.gradient_checkpointing)
    except (RuntimeError, MemoryError, ValueError) as exc:
        print(f"the step's limit could not be measured: {exc}", file=sys.stderr)
        return None


def run_preftune(job: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401 (the runtime, before any model loads)

    import preftune.train.loop  # noqa: F401
    from preftune.benchmark.limit import resident_gb
    from preftune.config import load_config
    from preftune.recipes import dpo
    from preftune.train.layout import resolve_layout
    from preftune.train.rundir import read_metrics

    runtime_rss_gb = resident_gb()  # imports only: the runtime's fixed cost

    # no final checkpoint or policy after the timed steps: TRL saves nothing either
    extra = list(job.get("preftune_overrides") or [])  # --preftune KEY=VALUE: e.g. train.gradient_checkpointing=true
    cfg = load_config(None, matched_overrides(job) + [f"run.dir={job['out_dir']}/run", "train.progress=false",
                                                      "run.plot=false", "train.save_final=false"] + extra)
    dpo.run(cfg)
    from preftune.data.tokenize import TokenizedPair

    items = [TokenizedPair(p, c, r, "bench") for p, c, r in job["preftune_ids"]]
    # the step-time breakdown preftune logs (time/*_s per step), averaged over the timed steps
    rows = read_metrics(Path(job["out_dir"]) / "run" / "metrics.jsonl")
    timed = [r for r in rows if r.get("step", 0) > job["warmup_steps"] and "time/forward_s" in r]
    phases = {k.removeprefix("time/").removesuffix("_s"): sum(r[k] for r in timed) / len(timed)
              for k in timed[0] if k.startswith("time/")} if timed else None
    layout = resolve_layout(cfg, items)
    limit = _measured_limit(job, cfg, layout) if job["device"] == "cpu" and job.get("rep", 0) == 0 else None
    return {"phase_s": phases, "limit": limit, "runtime_rss_gb": runtime_rss_gb,
            "settings": {"overrides": matched_overrides(job) + extra, "log_every": cfg.train.log_every,
                         "layout": layout, "compile": cfg.train.compile,
                         "gradient_checkpointing": cfg.train.gradient_checkpointing}}


def trl_args(job: dict, system: str) -> dict:
    """DPOConfig keyword arguments: the matched settings, plus TRL_BEST for trl-best."""
    matched = {
        "per_device_train_batch_size": job["n_pairs"], "gradient_accumulation_steps": 1,
        "max_steps": job["warmup_steps"] + job["timed_steps"], "learning_rate": job["lr"],
        "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        # torch's RMSprop class / torch's fused AdamW kernel, as preftune builds them (preftune's CPU RMSprop is
        # the same class with a chunked update, bit-identical)
        "optim": {"rmsprop": "rmsprop", "adamw": "adamw_torch_fused"}[job["optimizer"]],
        "max_grad_norm": job["max_grad_norm"], "beta": job["beta"], "loss_type": ["sigmoid"],
        "bf16": job["precision"] == "bf16", "fp16": False, "max_length": job["max_length"], "seed": job["seed"],
        "model_init_kwargs": {"dtype": "float32"},  # fp32 weights + autocast, as preftune
        "save_strategy": "no", "report_to": "none",
        "precompute_ref_log_probs": job.get("reference", "model") == "precomputed",
        "use_cpu": job["device"] == "cpu",  # transformers refuses bf16 on a machine without a GPU unless told
    }
    return {**matched, **(TRL_BEST if system == "trl-best" else {})}


def run_trl(job: dict, system: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    kwargs = trl_args(job, system)
    records = [json.loads(line) for line in Path(job["data"]).read_text(encoding="utf-8").splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = DPOTrainer(model=job["model_dir"], args=DPOConfig(output_dir=f"{job['out_dir']}/trl", **kwargs),
                         train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    ids = [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in trainer.train_dataset]
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in ids)
    trainer.train()
    effective = {k: getattr(trainer.args, k) for k in ("gradient_checkpointing", "bf16", "logging_steps",
                                                       "logging_strategy", "disable_tqdm", "precompute_ref_log_probs",
                                                       "optim", "max_grad_norm", "learning_rate", "beta")}
    return {"tokens_per_step": tokens, "tokens_match": ids == job["preftune_ids"],
            "settings": {"DPOConfig": {k: str(v) for k, v in kwargs.items()},
                         "effective": {k: str(v) for k, v in effective.items()}}}


def run_job(job: dict) -> dict:
    import torch

    from preftune.benchmark.allocator import check_loaded

    allocator = check_loaded(job.get("allocator", "system"))  # before any step: the run is what it says it is

    torch.manual_seed(job["seed"])
    cuda = job["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("workload needs CUDA, none available")
    start = time.perf_counter()
    clock = StepClock(cuda)
    try:
        out = run_preftune(job) if job["system"] == "preftune" else run_trl(job, job["system"])
    finally:
        clock.close()
    steps = job["warmup_steps"] + job["timed_steps"]
    if len(clock.times) != steps:
        raise RuntimeError(f"expected {steps} optimizer steps, the hook saw {len(clock.times)}")
    warm = job["warmup_steps"]
    step_s = [b - a for a, b in zip(clock.times[warm - 1:-1], clock.times[warm:])]
    step_cpu_s = [b - a for a, b in zip(clock.cpu_s[warm - 1:-1], clock.cpu_s[warm:])]
    step_minflt = [b - a for a, b in zip(clock.minflt[warm - 1:-1], clock.minflt[warm:])]
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if job["system"] != "preftune":
        import trl

        versions["trl"] = trl.__version__
    return {
        "step_s_list": step_s, "step_cpu_s_list": step_cpu_s, "step_minflt_list": step_minflt,
        "peak_rss_gb": clock.rss_gb[-1], "peak_gpu_gb": clock.gpu_gb[-1] if cuda else None,
        "peak_gpu_gb_with_load": max(clock.gpu_gb) if cuda else None,
        "until_first_timed_step_s": clock.times[warm - 1] - start, "torch_threads": torch.get_num_threads(),
        "tokens_per_step": out.pop("tokens_per_step", job["tokens_per_step"]), "versions": versions,
        "allocator": allocator, **out,
    }


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    if job["warmup_steps"] < 1:
        raise ValueError("warmup_steps must be >= 1: a step's time is measured from the previous step's end")
    result = run_job(job)
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
