"""Where and how a run computes: the device, the precision, threads and seeds, and the training-only settings
of a model about to be trained."""

from __future__ import annotations

from pathlib import Path

import torch

from preftune.config import Config
from preftune.errors import ConfigError
from preftune.train.distributed import Processes, world_size


def pick_device(cfg: Config | None = None, procs: Processes | None = None) -> torch.device:
    """``train.device``: ``auto`` takes a CUDA GPU when there is one, else the CPU; an explicit device that this
    machine lacks is a config error, not a silent fall-back. Under several processes (``procs``): accelerate's
    device for this process (one GPU per process)."""
    if procs is not None and procs.world > 1:
        return procs.device
    name = cfg.train.device if cfg is not None else "auto"
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'train.device': {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device.type not in available:
        raise ConfigError(f"config key 'train.device': {name!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    if not available[device.type] or (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"config key 'train.device': {name!r} is not available on this machine")
    return device


def prepare_for_training(model: torch.nn.Module, cfg: Config, procs: Processes | None = None) -> torch.nn.Module:
    """Training-only settings of a model about to be trained, in place, before it is wrapped for several processes
    (``procs``):

    - ``train.gradient_checkpointing``: recompute each decoder layer's activations in the backward (non-reentrant,
      so LoRA and frozen embeddings need no input-grad hooks);
    - a tied input embedding (SmolLM2's) hands the backward a sparse gradient for the few rows a batch uses,
      which autograd adds into the LM head's dense gradient of the same weight: the same sum, without a dense
      (vocabulary x hidden) zero-filled tensor per step (~10% of a CPU step on SmolLM2). Only when the head shares
      the weight, so the gradient the optimizer sees is always dense, and not under ``train.compile``: inductor
      cannot compile a backward that produces a sparse gradient (``Cannot access storage of SparseTensorImpl``),
      nor under several processes (DDP reduces dense gradient buckets);
    - ``train.compile``: the decoder compiled in place (``_compile_in_place``)."""
    if cfg.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False) and not hasattr(model, "base_model"):
            raise ConfigError(f"config key 'train.gradient_checkpointing': {type(model).__name__} does not support it")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if (isinstance(embedding, torch.nn.Embedding) and head is not None and embedding.weight is head.weight
            and embedding.weight.requires_grad and not cfg.train.compile and world_size() == 1):
        embedding.sparse = True
    if cfg.train.compile:
        _compile_in_place(model, procs)
    return model


def _compile_in_place(model: torch.nn.Module, procs: Processes | None) -> None:
    """torch.compile ``model``'s decoder in place, so parameter names (and checkpoints) are unchanged; under FSDP2
    each decoder layer is compiled inside its FSDP unit, whose hooks stay eager."""
    if procs is not None and procs.sharding == "fsdp2":
        from preftune.train.sharding import transformer_blocks

        for block in transformer_blocks(model):
            block.compile()
        return
    get_decoder = getattr(model, "get_decoder", None)  # a reward model's backbone is its own decoder
    (get_decoder() if get_decoder is not None else model).compile()


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU that supports it, fp32 elsewhere. Log-probs are fp32 regardless."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where autocast roughly halves a step."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def setup_threads(cfg: Config) -> None:
    """Thread count, and every global RNG seeded from ``train.seed`` (anything random that is not explicitly
    seeded elsewhere is still reproducible)."""
    import random

    import numpy as np

    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.tf32:  # process-wide, as torch's flag is; false leaves torch's setting (IEEE fp32 by default)
        matmul = torch.backends.cuda.matmul
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = "tf32"
        else:  # torch < 2.9
            matmul.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)


def peak_memory_gb(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident memory (everything it ever held: models, optimizer, activations), and on CUDA
    the peak of torch's allocator on its device."""
    import resource

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device is not None and device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
