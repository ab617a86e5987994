"""One explicit training loop for SFT, DPO and reward training.

``fit`` owns accumulation, clipping, the schedule, the log/eval/save cadence, resume and metrics. What a
step computes is the caller's ``step_fn``; the loop never branches on what is being trained.

Exact averages under gradient accumulation: all micro-batches of an optimizer step are fetched first, the
step's total weight W (pairs for DPO, completion tokens for SFT) is counted, and each micro-batch's SUMMED
loss is divided by W before backward. So 1 micro-batch of 8 and 8 micro-batches of 1 give the same
gradient, and a mean over tokens is a mean over all tokens of the step, not a mean of means. Metrics are
(sum, count) pairs accumulated as tensors and divided once per log step; an accuracy cannot exceed 1.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from preftune import faults
from preftune.config import TrainConfig
from preftune.data.collate import batch_to
from preftune.models.logprobs import autocast_context
from preftune.train.checkpoint import (latest_checkpoint, load_checkpoint, load_sharded_checkpoint, save_checkpoint,
                                       save_sharded_checkpoint)
from preftune.train.distributed import Processes
from preftune.train.sharding import scalar
from preftune.train.metrics import MetricSums, Stats
from preftune.train.optim import build_optimizer
from preftune.train.rundir import MetricsWriter
from preftune.train.signals import StopOnSignal, stop_run

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar: loss SUMMED over this micro-batch's units (pairs or tokens)
    stats: Stats = field(default_factory=dict)
    tokens: int = 0  # policy tokens processed (for tokens_per_s)
    pairs: int = 0  # pairs or examples processed (for pairs_per_s)


class DataOrder:
    """Deterministic shuffled order over ``n`` items: epoch e uses a permutation seeded by (seed, e).
    Its state (epoch, position) is saved in checkpoints, so a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("no training examples")
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), self.n - self.position)
            out += self._perm[self.position: self.position + take]
            self.position += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation()


def resolved_warmup(cfg: TrainConfig) -> int:
    """The paper's 150 warm-up steps, scaled down to short runs (at most 10% of the steps)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return min(150, max(1, cfg.max_steps // 10))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warmup = resolved_warmup(cfg)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


class PhaseTimer:
    """Where a step's time goes (``time/data_s``, ``time/forward_s``, ``time/backward_s``, ``time/optimizer_s`` in
    the metrics, per step, averaged over the logging window). CPU: the host's wall clock. CUDA: events recorded
    at the phase boundaries, read once per logging window, so the timing never synchronises inside a step (and
    the phases are GPU time; the data phase is the host's collate)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self.pending: list[tuple[str, Any, Any]] = []  # CUDA: (phase, start event, end event), read later
        self.host = 0.0  # the host clock at the previous lap
        self.mark: Any = None  # CUDA: the event at the previous lap
        self.steps = 0

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.host = time.perf_counter()

    def lap(self, name: str, host: bool = False) -> None:
        """The time since the previous lap goes to ``name``; ``host``: a host-side phase (timed on the host, and a
        new device mark after it)."""
        if self.cuda and not host:
            end = self._event()
            self.pending.append((name, self.mark, end))
            self.mark = end
            return
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.host
        self.host = now
        if self.cuda:
            self.mark = self._event()

    def read(self) -> dict[str, float]:
        """Per-step averages since the last read, then reset."""
        if self.pending:
            self.pending[-1][2].synchronize()
            for name, start, end in self.pending:
                self.totals[name] = self.totals.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        out = {f"time/{name}_s": total / max(self.steps, 1) for name, total in self.totals.items()}
        self.totals, self.pending, self.steps = {}, [], 0
        return out


@dataclass
class FitResult:
    step: int
    last_metrics: dict[str, float]
    last_eval: dict[str, float]


class _Window:
    """The current logging window: its metric sums (saved with a checkpoint, so a resumed row is the same), and
    the clock and the tokens and pairs seen since it opened (for the throughput metrics)."""

    def __init__(self, sums: MetricSums | None = None):
        self.sums = sums if sums is not None else MetricSums()
        self.start, self.tokens, self.pairs = time.perf_counter(), 0, 0

    def row(self, procs: Processes, lr: float, timer: PhaseTimer) -> dict[str, float]:
        """The window's metrics, summed over processes (the one sync point of a logging step)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = self.sums.summed(procs).means()
        tokens, pairs = (float(v) for v in procs.sum(torch.tensor([self.tokens, self.pairs], dtype=torch.float64)))
        out.update(lr=lr, pairs_per_s=pairs / elapsed, tokens_per_s=tokens / elapsed, **timer.read())
        return out


def fit(
    *,
    model: torch.nn.Module,
    items: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    step_fn: Callable[[dict[str, torch.Tensor]], StepOutput],
    weight_fn: Callable[[dict[str, torch.Tensor]], float],
    cfg: TrainConfig,
    run_dir: Path,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    resume: bool = False,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    procs: Processes | None = None,
) -> FitResult:
    """The training loop. Several processes (``procs``, train/distributed.py): each takes its slice of every
    global batch, the step function calls the DDP-wrapped module, and process 0 alone writes."""
    procs = procs if procs is not None else Processes()
    if procs.world > 1 and procs.ddp is None:
        raise RuntimeError("several processes need the step function to call the DDP-wrapped module (procs.wrap)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = procs.optimizer if procs.zero else build_optimizer(params, cfg)  # DeepSpeed: already in its engine
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    order = DataOrder(len(items), cfg.seed)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=procs.is_main)
    step, window, skips = _restore(resume, run_dir, model, optimizer, scheduler, order, metrics, device, procs)
    finished = resume and 0 < cfg.max_steps <= step  # resuming a finished run adds nothing (no second final eval)
    if finished:
        log.info("%s already finished at step %d (train.max_steps=%d): nothing to train", run_dir, step,
                 cfg.max_steps)
    model.train()
    progress = _progress(cfg, step, enabled=procs.is_main)
    timer = PhaseTimer(device)
    window.start = time.perf_counter()  # the first window's clock starts with its first step
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    save = functools.partial(_save, procs, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                             order=order, cfg=cfg, skips=skips)
    stop = StopOnSignal()
    try:
        with stop:
            while step < cfg.max_steps:
                timer.start()
                micro = [collate([items[i] for i in procs.shard(order.take(cfg.batch_size * procs.world))])
                         for _ in range(cfg.grad_accum_steps)]
                lr = scheduler.get_last_lr()[0]
                faults.set_step(step + 1)
                skips.record(_optimizer_step(micro, step_fn, weight_fn, params, optimizer, scheduler, window, timer,
                                             cfg, device, precision, procs), f"step {step + 1}", cfg)
                step += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    last = {**window.row(procs, lr, timer), "train/skipped_steps": skips.total}
                    metrics.write({"step": step, "epoch": order.epoch, **last})
                    window = _Window()
                    progress.set(step, last)
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                    last_eval = _run_eval(eval_fn, metrics, step, model)
                saved = bool(cfg.save_every) and step % cfg.save_every == 0 and step != cfg.max_steps
                if saved:
                    save(step, window.sums)
                faults.maybe_fault("after_step")
                asked = stop.requested(procs)
                if asked:
                    stop_run(asked, step, run_dir, None if saved else functools.partial(save, step, window.sums,
                                                                                         stopped=True))
            if eval_fn is not None and not finished:
                last_eval = _run_eval(eval_fn, metrics, step, model)
            if cfg.save_final and not finished:
                save(step, window.sums)
    finally:
        progress.close()
        metrics.close()
    return FitResult(step=step, last_metrics=last, last_eval=last_eval)


def _restore(resume: bool, run_dir: Path, model, optimizer, scheduler, order: DataOrder, metrics: MetricsWriter,
             device: torch.device, procs: Processes) -> tuple[int, _Window, Skips]:
    """(the step to continue from, the open logging window, the skipped steps so far): from the latest checkpoint
    on ``--resume``, else a fresh start. Metrics rows logged after the checkpoint are dropped (they will be logged
    again)."""
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        if resume:
            metrics.truncate_after(0)
        return 0, _Window(), Skips()
    if procs.sharding != "none":
        state = load_sharded_checkpoint(checkpoint, procs, model=model, optimizer=optimizer, scheduler=scheduler)
    else:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
    order.load(state["data"])
    # the window's sums were saved summed over processes: process 0 holds them, the others the same names at
    # zero (every process must sum the same names, or their collectives would not match)
    sums = MetricSums.from_state(state.get("metrics_window", {}), device)
    metrics.truncate_after(state["step"])
    return state["step"], _Window(sums if procs.is_main else sums.zeros_like()), Skips(state.get("skipped_steps", 0))


def _optimizer_step(micro: list[dict[str, torch.Tensor]], step_fn, weight_fn, params, optimizer, scheduler,
                    window: _Window, timer: PhaseTimer, cfg: TrainConfig, device: torch.device, precision: str,
                    procs: Processes) -> bool:
    """One optimizer step over its micro-batches: each micro-batch's summed loss divided by the step's total
    weight, gradients all-reduced only after the last (DDP), clipping, the update and the schedule. False: the
    loss or the gradient was not finite, and the update was skipped (the step's metrics too)."""
    step_sums = MetricSums()  # kept only if the step is taken
    total_weight = float(sum(weight_fn(b) for b in micro))
    if procs.world > 1:  # normalise by the global weight; DDP averages the gradients, hence x world
        total_weight = float(procs.sum(torch.tensor(total_weight, dtype=torch.float64)))
        total_weight /= procs.world if procs.grad_mean else 1
    timer.lap("data", host=True)
    for k, batch in enumerate(micro):
        with procs.no_sync(skip=k < len(micro) - 1):  # forward and backward: DDP's rule
            with autocast_context(device, precision):
                out = step_fn(batch_to(batch, device))
            if faults.active("nan_loss"):  # tests: a real NaN through the backward
                out.loss = out.loss * float("nan")
            timer.lap("forward")
            loss = out.loss / max(total_weight, 1.0 / procs.world)
            if procs.zero:  # the engine reduces, clips and steps at the last micro-batch (train/zero.py)
                procs.ddp.backward(loss, scale_wrt_gas=False)
                procs.ddp.step()
            else:
                loss.backward()
        timer.lap("backward")
        step_sums.add(out.stats)
        window.tokens += out.tokens
        window.pairs += out.pairs
    if procs.zero:  # the ZeRO optimizer skips a step whose gradient is not finite itself
        taken = procs.ddp.was_step_applied()
        grad_norm = torch.as_tensor(procs.ddp.get_global_grad_norm() if taken else float("nan"), dtype=torch.float32)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        taken, grad_norm = clipped_step(params, optimizer, scheduler, cfg.max_grad_norm)
    timer.lap("optimizer")
    timer.steps += 1
    if taken:
        window.sums.merge(step_sums)
        window.sums.add({"grad_norm": (grad_norm.detach().float(), torch.tensor(1.0))})
    return taken


def clipped_step(params, optimizer, scheduler, max_grad_norm: float) -> tuple[bool, torch.Tensor]:
    """Clip the gradient to ``max_grad_norm`` (0: no clipping) and step the optimizer, unless the gradient's norm
    is not finite: then no update (the step is skipped). The schedule steps either way (a skipped step still counts,
    as it does for the data order); the gradients are zeroed. Returns (taken, the norm before clipping). The norm is
    of the whole all-reduced or sharded gradient, the same on every process, so all processes skip together.

    ``clip_grad_norm_``'s arithmetic, with one pass less: torch multiplies every gradient by its clamped coefficient
    on every step, a read and a write of all of them that is exactly a no-op when the coefficient is 1 (the norm
    under the limit; 14 ms a step for SmolLM2's 0.5 GB of gradients on the 2-core EPYC). Here the same coefficient,
    computed by the same tensor operations, scales them only when it is below 1."""
    params = list(params)
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # a DTensor when sharded
    grad_norm = scalar(total)
    taken = bool(torch.isfinite(grad_norm))
    if taken:
        if max_grad_norm > 0 and float(torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0)) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total)
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return taken, grad_norm


class Skips:
    """Optimizer steps skipped for a non-finite loss or gradient: the total (``train/skipped_steps`` in every
    metrics row, kept in checkpoints) and the current streak, which stops the run past ``train.max_skipped_steps``."""

    def __init__(self, total: int = 0):
        self.total, self.streak = total, 0

    def record(self, taken: bool, where: str, cfg: TrainConfig) -> None:
        """``where``: the step, as the warning and the error name it ("step 7")."""
        if taken:
            self.streak = 0
            return
        self.total, self.streak = self.total + 1, self.streak + 1
        log.warning("%s skipped: the loss or the gradient is not finite (no update; %d skipped so far)",
                    where, self.total)
        if self.streak > cfg.max_skipped_steps:
            from preftune.errors import TrainingError

            raise TrainingError(f"{self.streak} steps in a row had a non-finite loss or gradient (up to {where}; "
                                f"train.max_skipped_steps={cfg.max_skipped_steps}): stopped; the last checkpoint "
                                f"written before them is intact")


def _save(procs: Processes, run_dir: Path, step: int, sums: MetricSums, *, model, optimizer, scheduler,
          order: DataOrder, cfg: TrainConfig, skips: Skips, stopped: bool = False) -> None:
    """A checkpoint (process 0 writes it; every process takes part in summing the metric window first; under
    FSDP2 every process writes its own shards). ``stopped``: written only because the run was asked to stop (not a
    point along training for :func:`~preftune.train.checkpoint.policies_along_training`)."""
    window = sums.summed(procs).state()
    extra = {"stopped": True} if stopped else {}
    if procs.sharding != "none":
        save_sharded_checkpoint(run_dir, procs, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                                trainer_state={"data": order.state(), "metrics_window": window,
                                               "skipped_steps": skips.total, **extra},
                                keep=cfg.keep_checkpoints)
        return
    if procs.is_main:
        save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"data": order.state(), "metrics_window": window,
                                       "skipped_steps": skips.total, **extra}, keep=cfg.keep_checkpoints)
    procs.barrier()


def _run_eval(eval_fn: Callable[[], dict[str, float]], metrics: MetricsWriter, step: int,
              model: torch.nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        result = {f"eval/{k}": v for k, v in eval_fn().items()}
    model.train()
    metrics.write({"step": step, **result})
    return result


class _progress:
    """A live tqdm bar showing the step and the headline metrics (off when ``train.progress=false``)."""

    def __init__(self, cfg: TrainConfig, start: int, enabled: bool = True):
        self.bar = None
        if cfg.progress and enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.last = start

    def set(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.last)
        self.last = step
        shown = {k.split("/")[-1] if k != "loss" else k: f"{v:.3g}" for k, v in metrics.items()
                 if k in ("loss", "rewards/accuracies", "rewards/margins")}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
