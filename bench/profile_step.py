"""Where one preftune DPO step spends its time: the cpu-short batch shape (4 pairs, 20-token prompts, 50-token
responses) on SmolLM2-135M, bf16 autocast, a live frozen reference, RMSprop; phases timed over several steps and
the top operators of one step from torch.profiler.

    python bench/profile_step.py [--layout padded|prefix_shared|packed] [--threads 2] [--steps 4] [--ops 25]
    python bench/profile_step.py --layout prefix_shared --memory --steps 2 --ops 0     # where the memory goes
    python bench/profile_step.py --layout prefix_shared --weight-cast cached --ops 0   # the weight-cast experiment
    python bench/profile_step.py --layout prefix_shared --memory --steps 3 --ops 0 --gradients free+trim
    python bench/profile_step.py --layout prefix_shared --memory --steps 3 --ops 0 --gradients bf16

``--memory``: the process's resident memory (now, and its peak since the previous line: Linux's VmHWM, reset
through /proc/self/clear_refs) after imports, each model, the optimizer, and each phase of the steps.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="padded", choices=("padded", "prefix_shared", "packed"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=20)
    ap.add_argument("--response", type=int, default=50)
    ap.add_argument("--ops", type=int, default=25, help="profiler rows to print (0: no profile)")
    ap.add_argument("--memory", action="store_true", help="resident memory after each load and phase")
    ap.add_argument("--shapes", action="store_true", help="profiler rows per input shape")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--data", help="real pairs instead of synthetic ones: the first --pairs of this file "
                                    "(any format preftune reads), tokenised with --max-length / --max-prompt")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--row-length", type=int, help="packed layout: tokens per row (default: the longest triple)")
    ap.add_argument("--weight-cast", default="autocast", choices=("autocast", "cached"),
                    help="cached: each policy linear's bf16 weight is cast once per weight update and reused, its "
                         "gradient cast back to fp32 (bit-identical to autocast; the issue's first direction)")
    ap.add_argument("--gradients", default="free", choices=("free", "free+trim", "keep", "bf16"),
                    help="after each step: free the gradients (preftune's loop); also hand the allocator's free "
                         "pages back (malloc_trim); or keep them allocated (zero_grad(set_to_none=False)); bf16: "
                         "also hold every exactly-bf16 gradient in bf16 until clipping")
    ap.add_argument("--sdpa", default="default", choices=("default", "math", "flash"),
                    help="restrict torch's scaled-dot-product attention to one backend")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from preftune.config import TrainConfig
    from preftune.data.collate import pair_collator
    from preftune.data.tokenize import TokenizedPair
    from preftune.losses import get_loss
    from preftune.models.load import load_causal_lm, load_reference
    from preftune.models.logprobs import autocast_context
    from preftune.models.reference import FrozenReference
    from preftune.train.objectives import dpo_forward
    from preftune.train.optim import build_optimizer

    if args.data:
        from preftune.data.records import read_preference_pairs
        from preftune.data.tokenize import tokenize_pair
        from preftune.models.load import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
        records, _ = read_preference_pairs(args.data, limit=args.pairs)
        pairs = [tokenize_pair(tokenizer, r, max_length=args.max_length, max_prompt_tokens=args.max_prompt)
                 for r in records]
    else:
        gen = torch.Generator().manual_seed(0)
        ids = lambda n: torch.randint(100, 40000, (n,), generator=gen).tolist()  # noqa: E731
        pairs = [TokenizedPair(ids(args.prompt), ids(args.response), ids(args.response - 7 * i), "bench")
                 for i in range(args.pairs)]
    memory = _MemoryLog(args.memory)
    memory("imports and data")
    collate = pair_collator(args.layout)
    batch = collate(pairs, pad_id=0, row_length=args.row_length) if args.row_length else collate(pairs, pad_id=0)
    policy = load_causal_lm("smollm2-135m", seed=0).train()
    if args.weight_cast == "cached":
        _cache_weight_casts(policy)
    memory("policy (fp32)")
    reference = FrozenReference(load_reference("smollm2-135m", seed=0), args.precision)
    memory("reference")
    loss_fn = get_loss("sigmoid", beta=0.1)
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], TrainConfig(lr=1e-6))
    device = torch.device("cpu")
    held = _hold_gradients_in_bf16(policy) if args.gradients == "bf16" else {}
    phases: dict[str, list[float]] = {"forward (ref + policy + loss)": [], "backward": [], "optimizer": []}

    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"default": contextlib.nullcontext, "math": lambda: sdpa_kernel(SDPBackend.MATH),
               "flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)}[args.sdpa]

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        with autocast_context(device, args.precision), backend():
            out = dpo_forward(policy, reference, loss_fn, batch, 0.0)
        t1 = time.perf_counter()
        memory("forward (activations held)")
        with backend():
            out.losses.mean().backward()
        t2 = time.perf_counter()
        del out
        memory("backward (gradients held)")
        for param, grad in held.items():  # --gradients bf16: back in fp32 before clipping, exactly as they were
            param.grad = grad.float()
        held.clear()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=args.gradients != "keep")
        if args.gradients == "free+trim":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        t3 = time.perf_counter()
        memory("optimizer step, gradients freed")
        if record:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[name].append(dt)

    step(False)
    for _ in range(args.steps):
        step(True)
    total = sum(sum(v) for v in phases.values()) / args.steps
    tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    print(f"layout={args.layout} threads={args.threads} precision={args.precision} sdpa={args.sdpa} "
          f"rows={tuple(batch['input_ids'].shape)} ({tokens} prompt+chosen+rejected tokens)")
    for name, values in phases.items():
        print(f"  {name:32s} {sum(values) / len(values):6.3f} s")
    steps = sorted(sum(values[i] for values in phases.values()) for i in range(args.steps))
    print(f"  {'step':32s} {total:6.3f} s   {args.pairs / total:.2f} pairs/s   (median {steps[len(steps) // 2]:.3f} s, "
          f"steps {[round(x, 2) for x in steps]}, "
          f"fastest {steps[0]:.3f} s)")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            step(False)
        print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total",
                                                                        row_limit=args.ops))


class _CachedCast(torch.autograd.Function):
    """The weight's bf16 copy, made earlier; the backward casts its gradient to fp32, as autocast's cast does."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        return cached

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(torch.float32), None


def _cache_weight_casts(model: torch.nn.Module) -> None:
    """Every linear but the LM head runs on a bf16 copy of its weight that is remade only when the weight changed
    (its version counter moved: the optimizer's in-place update), instead of autocast's cast on every forward."""
    import types

    import torch.nn.functional as F

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (torch.is_autocast_enabled("cpu") and w.dtype == torch.float32):
            return F.linear(x, w, self.bias)
        if getattr(self, "_bf16", None) is None or self._bf16[0] != (w.data_ptr(), w._version):
            self._bf16 = ((w.data_ptr(), w._version), w.detach().to(torch.bfloat16))
        cached = self._bf16[1]
        return F.linear(x, _CachedCast.apply(w, cached) if w.requires_grad and torch.is_grad_enabled() else cached,
                        self.bias)

    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.forward = types.MethodType(forward, module)


def _hold_gradients_in_bf16(model: torch.nn.Module) -> dict:
    """--gradients bf16: each gradient whose every value is a bf16 number (the low 16 bits of each fp32 word zero:
    under bf16 autocast, every linear weight's) moves to a bf16 copy as it lands; the step casts them back before
    clipping, so the update is bit-identical (bench/README.md, "The allocator": tried, not kept)."""
    held: dict = {}

    def landed(param: torch.Tensor) -> None:
        low = param.grad.view(-1).view(torch.int16)[(0 if sys.byteorder == "little" else 1)::2]
        if not low.any():
            held[param] = param.grad.to(torch.bfloat16)
            param.grad = None

    for param in model.parameters():
        param.register_post_accumulate_grad_hook(landed)
    return held


class _MemoryLog:
    """Prints resident memory now and its peak since the previous call (GiB); a no-op unless enabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            print(f"{'after':36s} {'resident':>9s} {'peak since previous':>20s}  (GiB)")

    def __call__(self, what: str) -> None:
        if not self.enabled:
            return
        fields = dict(line.split(":", 1) for line in open("/proc/self/status", encoding="ascii") if ":" in line)
        now, peak = (int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))
        print(f"{what:36s} {now:9.3f} {peak:20.3f}")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS


if __name__ == "__main__":
    main()
