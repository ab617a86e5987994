"""Model FLOPs utilisation (MFU) for the benchmark: the parameter count, FLOPs per token, and the hardware peak."""

from __future__ import annotations

import functools

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched in order against
# torch.cuda.get_device_name(); the denominator of MFU. Anything else (CPUs included): --peak-tflops.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4), ("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
    ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
    ("B200", 2250.0), ("B100", 1750.0),
)


def gpu_peak_tflops(name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (e.g. "NVIDIA H100 80GB HBM3"), or None when unknown."""
    return next((peak for key, peak in GPU_PEAK_BF16_TFLOPS if name and key in name), None)


def flops_per_token(n_params: int, reference: str) -> int:
    """Model FLOPs per policy token, the issue's accounting: 6N for the policy's forward and backward, plus 2N for
    a live reference's forward (none when its log-probs were precomputed). Recomputation under gradient
    checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
    return (8 if reference == "model" else 6) * n_params


def mfu(tokens_per_s: float | None, flops_token: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: policy tokens/s x FLOPs per token / peak. The tokens are counted as for every
    system (2 x prompt + chosen + rejected per pair), so a prefix-shared step that feeds each prompt once is
    credited with the FLOPs the plain layout would spend: comparable across systems, not hardware utilisation."""
    if tokens_per_s is None or not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


@functools.lru_cache(maxsize=4)
def meta_model(model_dir: str):
    """The model's modules built on the meta device: shapes without memory (built once per model directory; the
    parameter count and the memory breakdown both read it, and neither changes it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def count_parameters(model_dir: str) -> int:
    """N of the 8N accounting: every parameter, a tied embedding once (built on the meta device: no memory)."""
    return sum(p.numel() for p in meta_model(model_dir).parameters())
