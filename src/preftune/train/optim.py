"""Optimizers: torch's classes, with a leaner CPU update where torch has none.

``ChunkedRMSprop`` is ``torch.optim.RMSprop`` (same state, same state_dict, same arithmetic in the same order,
so the updates are bit-identical) whose plain CPU case (no momentum, not centered, real dense tensors) runs
through cache-sized chunks with two small reused buffers. torch's per-tensor loop allocates ``sqrt(square_avg)``
(and, with weight decay, ``grad + wd * param``) at full size for every parameter on every step; on a CPU that
is a fresh zero-filled mapping for every large tensor, and four passes over memory where one chunk in cache
does. Every other case (CUDA, momentum, centered, complex, sparse, maximize, capturable, differentiable,
an explicit foreach) is torch's own step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from preftune.config import TrainConfig

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 per operand: the chunk's grad, state and param stay in L2/L3


class ChunkedRMSprop(torch.optim.RMSprop):
    def _plain(self, group: dict) -> bool:
        return not (group["momentum"] or group["centered"] or group["maximize"] or group["capturable"]
                    or group["differentiable"] or group["foreach"])

    @torch.no_grad()
    def step(self, closure=None):
        if not all(self._plain(group) for group in self.param_groups) or any(
                p.grad is not None and (p.device.type != "cpu" or p.grad.is_sparse or torch.is_complex(p)
                                        or not p.is_contiguous() or not p.grad.is_contiguous()
                                        or p.dtype != p.grad.dtype)
                for group in self.param_groups for p in group["params"]):
            # torch's own step, unwrapped: the class's step is already wrapped with the optimizer hooks
            return getattr(torch.optim.RMSprop.step, "__wrapped__", torch.optim.RMSprop.step)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, square_avgs, steps = [], [], [], []
            self._init_group(group, params, grads, square_avgs, [], [], steps)
            lr, alpha, eps, wd = float(group["lr"]), group["alpha"], group["eps"], group["weight_decay"]
            for param, grad, square_avg, step in zip(params, grads, square_avgs, steps):
                step += 1
                _rmsprop_update(param.view(-1), grad.view(-1), square_avg.view(-1), self._buffers(param.dtype),
                                lr=lr, alpha=alpha, eps=eps, weight_decay=wd)
        return loss

    def _buffers(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two chunk-sized scratch buffers per dtype, owned by this optimizer (not in its state dict)."""
        buffers = self.__dict__.setdefault("_scratch", {})
        if dtype not in buffers:
            buffers[dtype] = (torch.empty(CHUNK_ELEMENTS, dtype=dtype), torch.empty(CHUNK_ELEMENTS, dtype=dtype))
        return buffers[dtype]


def _rmsprop_update(param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor,
                    buffers: tuple[torch.Tensor, torch.Tensor], *, lr: float, alpha: float, eps: float,
                    weight_decay: float) -> None:
    """The body of torch's ``_single_tensor_rmsprop`` (plain case) on flat views, chunk by chunk."""
    avg_buf, grad_buf = buffers
    n = param.numel()
    for start in range(0, n, CHUNK_ELEMENTS):
        end = min(n, start + CHUNK_ELEMENTS)
        p, g, s = param[start:end], grad[start:end], square_avg[start:end]
        if weight_decay != 0:
            g = torch.add(g, p, alpha=weight_decay, out=grad_buf[:end - start])
        s.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        avg = torch.sqrt(s, out=avg_buf[:end - start]).add_(eps)
        p.addcdiv_(g, avg, value=-lr)


def build_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """RMSprop, AdamW or SGD. CUDA: torch's multi-tensor RMSprop and fused AdamW. CPU: ``ChunkedRMSprop`` and torch's
    fused CPU AdamW (measured on 135M parameters, 2 threads: RMSprop step 0.08 s vs torch's 0.08-0.6 s, the slow
    end when its temporaries page-fault; AdamW 0.06 s vs 0.63 s for the per-tensor loop)."""
    from torch.distributed.tensor import DTensor

    cuda = bool(params) and params[0].is_cuda
    sharded = any(isinstance(p, DTensor) for p in params)  # FSDP2: torch's own implementations handle DTensors
    if cfg.optimizer == "sgd":  # plain SGD: no normalisation that could hide a gradient scale error
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        if cuda or sharded:
            return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
        return ChunkedRMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = bool(params) and not sharded and all(p.device.type in ("cuda", "cpu") and p.is_floating_point()
                                                 for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
