"""Several processes, one per device, through accelerate: ``accelerate launch`` or ``torchrun`` start them,
``accelerate`` sets up the process group (gloo on CPUs, NCCL on GPUs) and wraps the policy in
DistributedDataParallel. A single process (``WORLD_SIZE`` unset or 1) touches none of it.

What a run of N processes means (``preftune dpo``, ``sft`` and ``reward``; ``ppo``: rl/ppo_steps.py): ``train.batch_size`` is per
process, so a step sees N x batch_size x grad_accum_steps pairs (or examples); every process walks the same
seeded data order and takes its own contiguous slice of each global batch; the loss is normalised by the GLOBAL
pair or token count (summed across processes) and scaled by N, since DDP averages gradients, so the update
equals one process with N x batch_size (tested on 2 CPU processes); metrics are summed across processes before
they are reduced; each process evaluates its share of the eval split; process 0 writes the run directory,
metrics, checkpoints and the final policy, and the others wait for it.

``train.sharding=fsdp2`` (or an ``accelerate launch`` config with ``fsdp_version: 2``) shards instead of
replicating (train/sharding.py): the policy, its gradients and optimizer state, and the frozen reference are each
split across the processes. The update is the same (gradients are summed, the loss normalised by the global
count, without the x N above); the final policy is gathered whole into RUN/policy.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

log = logging.getLogger(__name__)

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_sharding(setting: str = "none") -> str:
    """``train.sharding``, or what an ``accelerate launch`` FSDP config asks for (accelerate's own FSDP wrapping is
    not used: preftune shards with torch's ``fully_shard`` itself, the same way on GPUs and CPUs)."""
    from preftune.errors import ConfigError

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        setting = _deepspeed_setting()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; preftune shards with FSDP2 "
                              "(fsdp_version: 2, see configs/accelerate/fsdp2.yaml)")
        unsupported = {  # accelerate's FSDP options preftune does not take over: refused, never ignored
            "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params (CPU offload is not supported)"),
            "FSDP_ACTIVATION_CHECKPOINTING": ("true", "fsdp_activation_checkpointing (use "
                                                      "train.gradient_checkpointing=true)"),
            "FSDP_RESHARD_AFTER_FORWARD": ("false", "fsdp_reshard_after_forward: false (preftune always reshards)"),
        }
        for name, (value, what) in unsupported.items():
            if os.environ.get(name, "").lower() == value:
                raise ConfigError(f"the accelerate config sets {what}; remove it (see configs/accelerate/fsdp2.yaml)")
        setting = "fsdp2"
    if setting != "none" and world_size() <= 1:
        raise ConfigError(f"train.sharding={setting} shards across several processes: start them with torchrun or "
                          "accelerate launch (one process has nothing to shard with)")
    if setting.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(f"train.sharding={setting} needs DeepSpeed: pip install 'preftune[deepspeed]'") from None
    return setting


def _deepspeed_setting() -> str:
    """``zeroN`` from an ``accelerate launch`` DeepSpeed config (configs/accelerate/zero2.yaml, zero3.yaml); the
    options preftune does not take over are refused, never ignored."""
    from preftune.errors import ConfigError

    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise ConfigError("the accelerate config names a DeepSpeed config file (deepspeed_config_file); preftune "
                          "builds DeepSpeed's config from train.* itself: give zero_stage instead (see "
                          "configs/accelerate/zero2.yaml)")
    for name in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        if os.environ.get(name, "none").lower() not in ("none", ""):
            raise ConfigError(f"the accelerate config asks for DeepSpeed offload ({name}); it is not supported: "
                              "remove it")
    if os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") != "1":
        raise ConfigError("the accelerate config sets gradient_accumulation_steps; preftune takes it from "
                          "train.grad_accum_steps: remove it there")
    if os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower() not in ("none", ""):
        raise ConfigError("the accelerate config sets gradient_clipping; preftune takes it from train.max_grad_norm: "
                          "remove it there")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("1", "2", "3"):
        raise ConfigError(f"the accelerate config asks for ZeRO stage {stage}; preftune runs stages 1, 2 and 3")
    return f"zero{stage}"


def check_sharding(procs: "Processes", cfg) -> None:
    """What sharding does not cover yet, refused before anything loads (never silently replicated or skipped)."""
    from preftune.errors import ConfigError

    if procs.sharding == "none":
        return
    if procs.sharding == "zero3" and cfg.train.compile:
        raise ConfigError("train.sharding=zero3 does not support train.compile=true: ZeRO-3 gathers each layer's "
                          "parameters anew at every call, so the compiled code recompiles until torch gives up and "
                          "runs it eagerly; compile under zero1, zero2 or fsdp2, or run zero3 without it")


class Processes:
    """This process's view of the run: rank, world size, and the few collective operations the loop needs."""

    def __init__(self, accelerator=None, sharding: str = "none"):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0
        self.sharding = sharding if self.world > 1 else "none"
        self.ddp: torch.nn.Module | None = None  # the wrapped module the step function calls
        self.optimizer: torch.optim.Optimizer | None = None  # DeepSpeed: preftune's optimizer inside the engine
        self._mesh = None

    @property
    def grad_mean(self) -> bool:
        """Whether the gradient reduction averages over processes (DDP, DeepSpeed) rather than sums (FSDP2 here)."""
        return self.sharding != "fsdp2"

    @property
    def zero(self) -> bool:
        """DeepSpeed ZeRO (train/zero.py): the engine owns the backward and the optimizer step."""
        return self.sharding.startswith("zero")

    @property
    def sharded_weights(self) -> bool:
        """The weights themselves are split (FSDP2, ZeRO-3): every forward is a collective all processes join."""
        return self.sharding in ("fsdp2", "zero3")

    @classmethod
    def from_env(cls, device_setting: str = "auto", sharding: str = "none") -> Processes:
        sharding = resolve_sharding(sharding)
        if world_size() <= 1:
            return cls(None)
        from preftune.errors import ConfigError

        if device_setting not in ("auto", "cpu", "cuda") or (device_setting == "cuda"
                                                             and not torch.cuda.is_available()):
            # not silently another device: accelerate gives each process its own (a CPU, or the next CUDA GPU)
            raise ConfigError(f"config key 'train.device': {device_setting!r} under several processes: each process "
                              "takes its own device; use auto, cpu or cuda (on a machine with CUDA GPUs)")
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        os.environ.pop("ACCELERATE_USE_FSDP", None)  # preftune shards itself (resolve_sharding)
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # and starts DeepSpeed's engine itself (train/zero.py)

        # precision is preftune's (train.precision, its own autocast): an `accelerate launch` config must not add
        # accelerate's autocast or a compile backend behind it. The long collective timeout covers the processes
        # that wait at a barrier while process 0 alone works: writing a large policy, gathering a sharded one,
        # plotting (NCCL's default is 10 minutes).
        return cls(Accelerator(cpu=device_setting == "cpu" or not torch.cuda.is_available(), mixed_precision="no",
                               dynamo_backend="no",
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))]), sharding)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    def wrap(self, module: torch.nn.Module, train=None) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (accelerate's ``prepare_model``), sharded in place with FSDP2, or
        in a DeepSpeed engine with the optimizer ``train`` asks for (``optimizer``); remembered as ``ddp``."""
        if self.zero:
            from preftune.train import zero
            from preftune.train.optim import build_optimizer

            if train is None:
                raise RuntimeError("DeepSpeed needs the train config to build the optimizer (procs.wrap(module, train))")
            self.optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], train)
            self.ddp = zero.initialize(module, self.optimizer, train, zero.STAGES[self.sharding])
            log.info("process %d holds %.3f of the trained model's parameters (DeepSpeed ZeRO-%d over %d processes)",
                     self.rank, zero.local_fraction(module), zero.STAGES[self.sharding], self.world)
        elif self.sharding == "fsdp2":
            from preftune.train.sharding import local_fraction, shard

            self.ddp = shard(module, self.mesh)
            log.info("process %d holds %.3f of the trained model's parameters (FSDP2 over %d processes)", self.rank,
                     local_fraction(module), self.world)
        else:
            self.ddp = self.accelerator.prepare_model(module)
        return self.ddp

    def load_device(self, device: torch.device) -> torch.device:
        """Where a model goes before it is wrapped: under FSDP2 it stays in host memory and ``fully_shard`` moves
        each process's shards (one unit at a time) to ``device``, so no GPU ever holds a whole model."""
        return torch.device("cpu") if self.sharding == "fsdp2" else device

    def evaluated(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module an evaluation calls: ``module`` itself, or with sharded weights the wrapper that gathers them
        (FSDP2's root, whose forward gathers the embeddings and head; ZeRO-3's engine)."""
        return self.ddp if self.sharded_weights else module

    def shard_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen module (the reference) sharded like the policy under FSDP2, a ZeRO-3 inference engine under any
        ZeRO stage; as it is otherwise."""
        if self.zero:
            from preftune.train import zero

            engine = zero.frozen(module)
            log.info("process %d holds %.3f of the frozen model's parameters (DeepSpeed ZeRO-3 over %d processes)",
                     self.rank, zero.local_fraction(module), self.world)
            return engine
        if self.sharding != "fsdp2":
            return module
        from preftune.train.sharding import local_fraction, shard

        shard(module, self.mesh).set_reshard_after_forward(True)  # the root too: no backward comes to reuse it
        log.info("process %d holds %.3f of the frozen model's parameters (FSDP2 over %d processes)", self.rank,
                 local_fraction(module), self.world)
        return module

    def unsharded(self, module: torch.nn.Module, build, prefix: str = "") -> torch.nn.Module | None:
        """The trained ``module`` as one whole model to save: itself, or under FSDP2 its weights gathered from the
        wrapped root (``ddp``; ``prefix``: the module's name in it) into ``build()``'s fresh model on process 0
        (None on the others). Every process must call it."""
        if not self.sharded_weights:
            return module  # whole on every process
        if self.zero:
            from preftune.train.zero import full_state_dict

            state = full_state_dict(self.ddp, self.is_main)
        else:
            from preftune.train.sharding import full_state_dict

            state = full_state_dict(self.ddp)
        if not self.is_main:
            return None
        fresh = build()
        missing, unexpected = fresh.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()},
                                                    strict=False)
        tied = {n for n, p in fresh.named_parameters(remove_duplicate=False)} - set(dict(fresh.named_parameters()))
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"gathering the sharded model: missing {sorted(set(missing) - tied)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
        return fresh

    def shard(self, indices: list[int]) -> list[int]:
        """This process's contiguous slice of a global batch of ``world`` x batch_size indices."""
        per = len(indices) // self.world
        return indices[self.rank * per:(self.rank + 1) * per]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes (the tensor itself in one process)."""
        if self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction="sum")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0 in process order, on the CPU of each."""
        if self.world == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.device)).cpu()

    def gather_objects(self, value) -> list:
        """Every process's ``value`` (any picklable object), in process order."""
        if self.world == 1:
            return [value]
        from torch import distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

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
        number of processes is evaluated whole by each (every process must produce the same metric names), and
        so is every split under FSDP2, where each forward is a collective that every process must join."""
        if self.world == 1 or len(items) < self.world or self.sharded_weights:
            return items, False
        return items[self.rank::self.world], True

    def no_sync(self, skip: bool):
        """Inside: the backward does not reduce gradients (a micro-batch before the last of a step)."""
        if self.ddp is not None and self.sharding == "fsdp2":
            self.ddp.set_requires_gradient_sync(not skip)
            return contextlib.nullcontext()
        if self.zero:  # the engine knows its accumulation boundary
            return contextlib.nullcontext()
        if self.ddp is None or not skip:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def run_dir(self, cfg, command: str, resume: bool):
        """The run directory: named and written (config, env) by process 0, its name broadcast to the others."""
        from pathlib import Path

        from preftune.train.rundir import make_run_dir

        from preftune.errors import ConfigError

        outcome = None
        if self.is_main:  # process 0 takes the directory; a refusal is raised by every process, not only the first
            try:
                outcome = str(make_run_dir(cfg, command)) if not resume else _continue_run_dir(cfg, command)
            except ConfigError as exc:
                outcome = exc
        outcome = self.broadcast(outcome)
        if isinstance(outcome, ConfigError):
            raise outcome
        if not resume:
            cfg.run.dir = outcome
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



def _continue_run_dir(cfg, command: str) -> None:
    """A resumed run's directory: taken for this process, and its config.yaml rewritten with the overrides the
    resume applied (only keys that may change on resume), so the directory keeps describing the run."""
    from pathlib import Path

    from preftune.train.rundir import lock_run_dir, write_run_config

    lock_run_dir(Path(cfg.run.dir))
    write_run_config(cfg, Path(cfg.run.dir), command)
