"""How fast a DPO step could be on this machine, and where a step's memory goes.

**The limit.** A step's matrix products, each timed on this machine alone at the step's own shapes and types
(``torch.mm`` on random operands, the threads the run used), plus the optimizer's memory traffic at this
machine's measured bandwidth (a streaming ``a + b``), plus attention timed as ``scaled_dot_product_attention``
at the step's row shapes. What a step cannot avoid, each at the speed this machine reaches on it alone; every
other cost (casts, fills, the allocator, Python, elementwise layers) is what the measured step adds on top.

The shapes follow preftune's step for a Llama-family model:
- the body (7 projections per layer) on every token of the batch's rows, padding included: ``padded`` 2 rows
  per pair, ``prefix_shared`` one row per pair (prompt + chosen + rejected), ``packed`` one row for the batch;
  the policy's forward and backward (dX and dW per projection), the live reference's forward;
- the LM head on the response tokens only (the positions with a label): fp32 forward for the policy and the
  reference, a bf16 backward (dX, dW) under bf16 autocast;
- the optimizer: every parameter's bytes read and written once per update, plus one read of the gradients for
  the norm (RMSprop: p, g, state read; p, state written; AdamW: two states; SGD: none).

**The memory breakdown.** Policy weights, gradients and optimizer state (fp32), the frozen reference (its
decoder's linear weights in bf16 under bf16, as preftune stores them; none when precomputed), the runtime's
fixed cost (a fresh process that imported torch, transformers and preftune's training code), and what is left of
the peak: activations, temporaries and the allocator's slack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
STATE_BYTES = {"rmsprop": 4, "adamw": 8, "sgd": 0}  # optimizer state per fp32 parameter
# bytes moved per parameter by one update: reads and writes of p, g and the state, plus the norm's read of g
TRAFFIC_BYTES = {"rmsprop": 24, "adamw": 32, "sgd": 16}


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shapes":
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, config.vocab_size)

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of each decoder projection, in PROJECTIONS order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [(h, self.heads * self.head_dim), (h, kv), (h, kv), (self.heads * self.head_dim, h),
                (h, self.intermediate), (h, self.intermediate), (self.intermediate, h)]


def rows_of(batch: list[tuple[int, int, int]], layout: str) -> tuple[int, int]:
    """(rows, row length) the body runs on for a batch of (prompt, chosen, rejected) token counts."""
    if layout == "packed":
        return 1, sum(p + c + r for p, c, r in batch)
    if layout == "prefix_shared":
        return len(batch), max(p + c + r for p, c, r in batch)
    return 2 * len(batch), max(p + max(c, r) for p, c, r in batch)


def matmuls(shapes: Shapes, batch: list[tuple[int, int, int]], layout: str, *, reference: bool,
            precision: str, part: bool = False, recompute: bool = False) -> list[tuple]:
    """The step's matrix products as (M, K, N, dtype, count): C[M, N] = A[M, K] @ B[K, N]; with ``part``, each
    also names its part ("body" or "head") last. ``recompute`` (gradient checkpointing): the backward runs each
    decoder layer's forward again (the head is outside the layers)."""
    rows, length = rows_of(batch, layout)
    tokens, head_tokens = rows * length, sum(c + r for _, c, r in batch)
    body = "bf16" if precision == "bf16" else "fp32"
    out: dict[tuple, int] = {}

    def add(m, k, n, dtype, count, where):
        key = (m, k, n, dtype, where) if part else (m, k, n, dtype)
        out[key] = out.get(key, 0) + count

    for k, n in shapes.projections():
        # policy (+ recomputed) (+ reference) forward
        add(tokens, k, n, body, shapes.layers * (1 + recompute + reference), "body")
        add(tokens, n, k, body, shapes.layers, "body")  # policy backward, dX = dY @ W
        add(n, tokens, k, body, shapes.layers, "body")  # policy backward, dW = dY^T @ X
    h, v = shapes.hidden, shapes.vocab
    add(head_tokens, h, v, "fp32", 2 if reference else 1, "head")  # the head's forward, fp32 for log-probs
    add(head_tokens, v, h, body, 1, "head")
    add(v, head_tokens, h, body, 1, "head")
    return [(*key[:4], count, *key[4:]) for key, count in out.items()]


def flops(products: list[tuple[int, int, int, str, int]]) -> dict[str, int]:
    """Total FLOPs (2 M K N per product) by dtype."""
    total: dict[str, int] = {}
    for m, k, n, dtype, count in products:
        total[dtype] = total.get(dtype, 0) + 2 * m * k * n * count
    return total


def _best_time(fn, min_s: float = 0.05, reps: int = 3) -> float:
    """The best of ``reps`` averages of ``fn()`` over at least ``min_s`` each (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        best = min(best, elapsed / n)
    return best


def time_matmul(m: int, k: int, n: int, dtype: str) -> float:
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(m, k, dtype=kind), torch.randn(k, n, dtype=kind)
    out = torch.empty(m, n, dtype=kind)
    return _best_time(lambda: torch.mm(a, b, out=out))


def stream_bandwidth(n: int = 1 << 25) -> float:
    """Bytes/s of ``c = a + b`` on fp32 arrays far larger than the caches (12 bytes per element)."""
    import torch

    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    return 12 * n / _best_time(lambda: torch.add(a, b, out=c))


def time_attention(rows: int, length: int, shapes: Shapes, dtype: str, backward: bool) -> float:
    """One layer's causal SDPA at the step's row shape (forward, or forward and backward)."""
    import torch
    import torch.nn.functional as F

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    q = torch.randn(rows, shapes.heads, length, shapes.head_dim, dtype=kind, requires_grad=backward)
    k, v = (torch.randn(rows, shapes.heads, length, shapes.head_dim, dtype=kind, requires_grad=backward)
            for _ in range(2))

    def run():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.sum().backward()

    if not backward:
        with torch.no_grad():
            return _best_time(run)
    return _best_time(run)


def unmodelled(cfg) -> list[str]:
    """What in a ``preftune dpo`` config the limit does not model: it times full fine-tuning of every weight (its
    optimizer over all of them) with a frozen reference that is a model of its own, precomputed or none. Under
    LoRA (no weight gradient for the frozen base, an optimizer over the adapter alone) or the adapter reference
    the step does other work, so no limit is printed for it rather than a wrong one."""
    return [what for what, on in (("lora.enabled", cfg.lora.enabled),
                                  ("reference.mode=adapter", cfg.reference.mode == "adapter")) if on]


def step_limit(config, batches: list[list[tuple[int, int, int]]], layout: str, *, reference: bool,
               precision: str, optimizer: str, n_params: int, threads: int, recompute: bool = False) -> dict:
    """The limit for the average of ``batches`` (each a step's (prompt, chosen, rejected) token counts)."""
    import torch

    torch.set_num_threads(threads)
    shapes = Shapes.of(config)
    timed: dict[tuple[int, int, int, str], float] = {}
    parts = {"body_matmuls_s": 0.0, "head_matmuls_s": 0.0, "attention_s": 0.0}
    dtype = "bf16" if precision == "bf16" else "fp32"
    for batch in batches:
        for m, k, n, kind, count, where in matmuls(shapes, batch, layout, reference=reference, precision=precision,
                                                   part=True, recompute=recompute):
            if (m, k, n, kind) not in timed:
                timed[(m, k, n, kind)] = time_matmul(m, k, n, kind)
            parts[f"{where}_matmuls_s"] += count * timed[(m, k, n, kind)] / len(batches)
        rows, length = rows_of(batch, layout)
        forwards = reference + recompute  # forward-only passes: the reference's, the recomputed one
        layer = time_attention(rows, length, shapes, dtype, True) + (
            forwards * time_attention(rows, length, shapes, dtype, False) if forwards else 0.0)
        parts["attention_s"] += shapes.layers * layer / len(batches)
    bandwidth = stream_bandwidth()
    parts["optimizer_s"] = TRAFFIC_BYTES[optimizer] * n_params / bandwidth
    total_flops = {k: v / len(batches) for k, v in flops(
        [p for b in batches for p in matmuls(shapes, b, layout, reference=reference, precision=precision,
                                             recompute=recompute)]).items()}
    matmul_s = parts["body_matmuls_s"] + parts["head_matmuls_s"]
    return {"limit_s": sum(parts.values()), **parts, "bandwidth_gb_s": bandwidth / 1e9,
            "matmul_tflops": {k: v / 1e12 for k, v in total_flops.items()},
            "matmul_rate_tflop_s": sum(total_flops.values()) / matmul_s / 1e12 if matmul_s else None,
            "layout": layout, "threads": threads}


def resident_gb() -> float | None:
    """This process's resident memory now in GiB (not its high-water mark: imports allocate transients); None
    where /proc is not there."""
    import os

    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return None


def memory_breakdown(model_dir: str, *, reference: str, precision: str, optimizer: str, peak_gb: float,
                     runtime_gb: float) -> dict:
    """Where ``peak_gb`` goes (GiB, the unit of the bench's peak memory): policy weights, gradients, optimizer state, reference, runtime, the rest."""
    import torch

    from preftune.benchmark.flops import meta_model

    model = meta_model(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}.")
    gb = 2**30  # the unit of the bench's peak_mem_gb (ru_maxrss)
    parts = {"weights": 4 * n_params / gb, "gradients": 4 * n_params / gb,
             "optimizer_state": STATE_BYTES[optimizer] * n_params / gb,
             "reference": 0.0 if reference == "precomputed" else (
                 (2 * linear + 4 * (n_params - linear)) if precision == "bf16" else 4 * n_params) / gb,
             "runtime": runtime_gb}
    parts["activations_and_rest"] = peak_gb - sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


def step_batches(job: dict, steps: int = 3) -> list[list[tuple[int, int, int]]]:
    """(prompt, chosen, rejected) token counts of the workload's first ``steps`` batches."""
    n = job["n_pairs"]
    counts = [(len(p), len(c), len(r)) for p, c, r in job["preftune_ids"]]
    return [counts[i:i + n] for i in range(0, min(len(counts), steps * n), n) if len(counts[i:i + n]) == n]


def workload_limit(base: dict, row: dict, step_s: float, peak_gb: float) -> dict | None:
    """The limit the preftune child measured (CPU workloads), against its measured step, and the breakdown of
    its peak memory; None where there is none."""
    limit = row.get("limit")
    if row.get("error") or not limit or row.get("runtime_rss_gb") is None:
        return None
    return {**limit, "step_s": step_s, "step_over_limit": step_s / limit["limit_s"],
            "memory_gb": memory_breakdown(base["model_dir"], reference=base["reference"],
                                          precision=base["precision"], optimizer=base["optimizer"],
                                          peak_gb=peak_gb, runtime_gb=row["runtime_rss_gb"])}


def format_limit(limit: dict) -> str:
    parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {limit[k]:.3f}"
                      for k in ("body_matmuls_s", "head_matmuls_s", "attention_s", "optimizer_s"))
    memory = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in limit["memory_gb"].items())
    return (f"{limit['limit_s']:.3f} s/step ({parts}; matmuls at {limit['matmul_rate_tflop_s']:.2f} TFLOP/s, "
            f"{limit['bandwidth_gb_s']:.1f} GB/s); measured step {limit['step_s']:.3f} s = "
            f"{limit['step_over_limit']:.2f}x the limit. Peak memory (GiB): {memory}")
