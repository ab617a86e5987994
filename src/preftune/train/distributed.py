"""Several processes, one per device, through accelerate: ``accelerate launch`` or ``torchrun`` start them,
``accelerate`` sets up the process group (gloo on CPUs, NCCL on GPUs) and wraps the policy in
DistributedDataParallel. A single process (``WORLD_SIZE`` unset or 1) touches none of it.

What a run of N processes means (``preftune dpo``, ``sft`` and ``reward``): ``train.batch_size`` is per
process, so a step sees N x batch_size x grad_accum_steps pairs (or examples); every process walks the same
seeded data order and takes its own contiguous slice of each global batch; the loss is normalised by the GLOBAL
pair or token count (summed across processes) and scaled by N, since DDP averages gradients, so the update
equals one process with N x batch_size (tested on 2 CPU processes); metrics are summed across processes before
they are reduced; each process evaluates its share of the eval split; process 0 writes the run directory,
metrics, checkpoints and the final policy, and the others wait for it.
"""

from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_only(command: str) -> None:
    """Commands that do not split their work across processes refuse to run as several (they would train N
    independent copies that all write one run directory)."""
    if world_size() > 1:
        from preftune.errors import ConfigError

        raise ConfigError(f"preftune {command} runs in one process; several processes (WORLD_SIZE="
                          f"{world_size()}) are supported by preftune dpo, sft and reward")


class Processes:
    """This process's view of the run: rank, world size, and the few collective operations the loop needs."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0
        self.ddp: torch.nn.Module | None = None  # the wrapped module the step function calls

    @classmethod
    def from_env(cls, device_setting: str = "auto") -> Processes:
        if world_size() <= 1:
            return cls(None)
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        # precision is preftune's (train.precision, its own autocast): an `accelerate launch` config must not add
        # accelerate's autocast or a compile backend behind it. The long collective timeout covers the processes
        # that wait while process 0 precomputes reference log-probs (NCCL's default is 10 minutes).
        return cls(Accelerator(cpu=device_setting == "cpu" or not torch.cuda.is_available(), mixed_precision="no",
                               dynamo_backend="no",
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))]))

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (accelerate's ``prepare_model``); remembered as ``ddp``."""
        self.ddp = self.accelerator.prepare_model(module)
        return self.ddp

    def shard(self, indices: list[int]) -> list[int]:
        """This process's contiguous slice of a global batch of ``world`` x batch_size indices."""
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes (the tensor itself in one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum")

    def sum_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """(sum, count) metric pairs summed over processes, one collective for all of them."""
        if self.world == 1 or not stats:
            return stats
        names = sorted(stats)
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                            for name in names for v in stats[name]])
        total = self.sum(flat)
        return {name: (total[2 * i], total[2 * i + 1]) for i, name in enumerate(names)}

    def eval_shard(self, items: list) -> tuple[list, bool]:
        """(this process's share of an eval split, whether it is shared out): every ``world``-th item, so each
        process evaluates about 1/world of it, then ``sum_stats`` adds the sums up. A split smaller than the
        number of processes is evaluated whole by each (every process must produce the same metric names)."""
        if self.world == 1 or len(items) < self.world:
            return items, False
        return items[self.rank::self.world], True

    def no_sync(self, skip: bool):
        """Inside: the backward does not all-reduce gradients (a micro-batch before the last of a step)."""
        if self.ddp is None or not skip:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def run_dir(self, cfg, command: str, resume: bool):
        """The run directory: named and written (config, env) by process 0, its name broadcast to the others."""
        from pathlib import Path

        from preftune.train.rundir import make_run_dir

        if not resume:
            cfg.run.dir = self.broadcast(str(make_run_dir(cfg, command)) if self.is_main else None)
        return Path(cfg.run.dir)

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def broadcast(self, value):
        """Process 0's ``value`` on every process (any picklable object)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]
