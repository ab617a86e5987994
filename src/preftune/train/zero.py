"""DeepSpeed ZeRO for the policy, the frozen reference and the reward model (``train.sharding=zero1|zero2|zero3``,
or an ``accelerate launch`` config with ``distributed_type: DEEPSPEED``: configs/accelerate/zero2.yaml, zero3.yaml).

The trained module is handed to ``deepspeed.initialize`` with preftune's own optimizer (built by
``train.optim.build_optimizer`` on its trainable parameters) and a config made from ``train.*``: the micro-batch
is ``train.batch_size``, the accumulation ``train.grad_accum_steps``, the clipping ``train.max_grad_norm``. The
engine owns the backward and the step (``engine.backward`` / ``engine.step``, which steps the optimizer at the
last micro-batch of each step); the loop keeps the loss normalisation, the schedule (a ``LambdaLR`` on preftune's
optimizer, which the ZeRO optimizer steps), the metrics and the checkpoints. Stage 1 partitions the optimizer
state, 2 also the gradients, 3 also the parameters. Gradients are averaged over processes as under DDP, so the
loss carries the same x N (the update equals one process's; tested on 2 CPU processes over gloo, which
DeepSpeed's CPU accelerator uses when oneCCL is absent).

The frozen reference is always a stage-3 inference engine, whatever the policy's stage: stages 1 and 2 would
leave a whole reference on every process (they partition only what training adds to the weights).

Precision: the weights stay fp32 (DeepSpeed's master copy is then the weights themselves) and ``train.precision``
is preftune's autocast, as on one process; DeepSpeed's own ``bf16``/``fp16`` modes are not used. A step whose
gradient is not finite is skipped by the ZeRO optimizer itself (its overflow check); the loop reads
``was_step_applied``.

Checkpoints are preftune's, not ``engine.save_checkpoint`` (whose files are pickles): every process writes its
fp32 partitions and its share of the optimizer state as safetensors; they resume on the same number of
processes and the same stage. The final policy is gathered whole on process 0.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def buckets(module: nn.Module, stage: int) -> dict[str, Any]:
    """Communication buckets sized to the model, as Hugging Face's "auto" values do (hidden size squared;
    stage 3: prefetch 0.9 x that, parameters under 10 x hidden kept whole). DeepSpeed's own defaults (500M
    elements a bucket, 1e9 live parameters) exceed a small model: measured on 2 CPU processes with 362M
    parameters, ZeRO-3 then peaked above one unsharded process (10.6 GiB against 7.8)."""
    config = getattr(getattr(module, "model", module), "config", None)
    hidden = getattr(config, "hidden_size", None)
    if not hidden:
        return {}
    size = hidden * hidden
    if stage < 3:
        return {"reduce_bucket_size": size, "allgather_bucket_size": size}
    return {"reduce_bucket_size": size, "stage3_prefetch_bucket_size": int(0.9 * size),
            "stage3_param_persistence_threshold": 10 * hidden, "stage3_max_live_parameters": 10 * size}


def engine_config(train, stage: int, module: nn.Module | None = None) -> dict[str, Any]:
    """The DeepSpeed config a run's ``train`` section asks for (nothing else of DeepSpeed's is switched on), with
    buckets sized to ``module``."""
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": float(train.max_grad_norm),
        "zero_optimization": {"stage": stage, **(buckets(module, stage) if module is not None else {})},
        "zero_allow_untested_optimizer": True,  # preftune's own RMSprop / AdamW / SGD
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def initialize(module: nn.Module, optimizer: torch.optim.Optimizer, train, stage: int):
    """``module`` and ``optimizer`` in a DeepSpeed engine (parameters partitioned in place under stage 3)."""
    import deepspeed

    _register_head(module, stage)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=engine_config(train, stage, module))
    return engine


def frozen(module: nn.Module):
    """A frozen module (the reference) as a stage-3 inference engine: its parameters partitioned across the
    processes, gathered one layer at a time in its forward (every process must take part in every forward)."""
    import deepspeed

    _register_head(module, 3)
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 2**62,
              "zero_optimization": {"stage": 3, **buckets(module, 3), "stage3_param_persistence_threshold": 0}}
    engine = deepspeed.initialize(model=module, config=config)[0]
    engine.eval()
    return engine


def _register_head(module: nn.Module, stage: int) -> None:
    """A ``LogpsModule`` multiplies the hidden states by the LM head's weight itself (the chunked log-probs), not
    by calling the head: under stage 3 that weight must be gathered for the wrapper's whole forward."""
    from preftune.models.logprobs import LogpsModule

    if stage != 3 or not isinstance(module, LogpsModule):
        return
    from deepspeed.runtime.zero import register_external_parameter

    head = module.model.get_output_embeddings()
    if head is not None:
        register_external_parameter(module, head.weight)


def local_fraction(module: nn.Module) -> float:
    """The share of ``module``'s parameter elements this process holds (stage 3's partitions; 1.0 otherwise)."""
    total = local = 0
    for p in module.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else numel
    return local / max(total, 1)


def fp32_partitions(engine) -> list[torch.Tensor]:
    """This process's flat fp32 master partitions (one per parameter group): what a checkpoint keeps."""
    opt = engine.optimizer
    groups = getattr(opt, "single_partition_of_fp32_groups", None)  # stages 1 and 2
    return list(groups if groups is not None else opt.fp32_partitioned_groups_flat)  # stage 3


def restore_partitions(engine, tensors: list[torch.Tensor]) -> None:
    """Copy saved fp32 partitions back and update the model's weights from them (on every process)."""
    opt = engine.optimizer
    current = fp32_partitions(engine)
    if len(current) != len(tensors) or any(a.shape != b.shape for a, b in zip(current, tensors)):
        raise RuntimeError("the checkpoint's ZeRO partitions do not match this run's (another model or layout)")
    with torch.no_grad():
        for dst, src in zip(current, tensors):
            dst.copy_(src)
        if hasattr(opt, "update_lp_params"):  # stages 1 and 2: the partitions, then an all-gather of the weights
            opt.update_lp_params()
        else:  # stage 3: each process's weights are its partitions
            for low, high in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                low.copy_(high)


def full_state_dict(engine, is_main: bool) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the engine's module whole on the CPU of process 0 (empty elsewhere). A
    collective under stage 3: every process calls it."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers each parameter whole onto process 0
        return {k: v.detach().cpu() for k, v in state.items()} if is_main and state else {}
    if not is_main:
        return {}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


@contextlib.contextmanager
def optimizer_params(engine):
    """Inside: preftune's optimizer lists its parameters (ZeRO-3 points its groups at each fp32 partition only while
    it steps it, so that its state can be read or loaded); a no-op under stages 1 and 2."""
    opt = engine.optimizer
    if not hasattr(opt, "_set_fp32_optimizer_param_groups"):
        yield
        return
    opt._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        opt._clear_fp32_optimizer_param_groups()
