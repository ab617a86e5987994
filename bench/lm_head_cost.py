"""The LM-head cost of one DPO policy pass on the cpu-long-prompt batch shape (8 rows x 439 positions, 316 of them
completion tokens; SmolLM2's 576 x 49152 head), forward + backward, bf16 autocast:

- TRL 1.16's fused chunked head as DPOTrainer calls it on a CPU: every position (its Triton path, which scores only
  the label positions, exists on CUDA/XPU only), with the entropy / mean-logit / top-1 outputs its metrics use;
- preftune's ``_head_logps``: the completion positions only, fp32.

    python bench/lm_head_cost.py
"""

from __future__ import annotations

import time

import torch

from preftune.models.logprobs import _head_logps

VOCAB, HIDDEN, ROWS, POSITIONS, COMPLETION = 49152, 576, 8, 439, 316


def main() -> None:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    n_all = ROWS * POSITIONS
    mask = torch.zeros(n_all, dtype=torch.bool)
    mask[:COMPLETION] = True

    def trl() -> None:
        hidden = torch.randn(n_all, HIDDEN, requires_grad=True)
        targets = torch.randint(0, VOCAB, (n_all,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, *_ = ChunkedLogProbFunction.apply(hidden, head.weight, None, targets, 1.0, 32768, None, 1.0,
                                                     ("log_probs", "entropy", "mean_logits", "is_top1"))
        (logps * mask).sum().backward()

    def ours() -> None:
        hidden = torch.randn(COMPLETION, HIDDEN, requires_grad=True)
        targets = torch.randint(0, VOCAB, (COMPLETION,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = _head_logps(head, hidden, targets, 1024)
        logps.sum().backward()

    for name, fn in ((f"TRL fused head, all {n_all} positions", trl),
                     (f"preftune head, {COMPLETION} completion positions", ours)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name}: forward + backward {min(times):.2f} s (best of 3)")


if __name__ == "__main__":
    main()
