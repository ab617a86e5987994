"""The CPU optimizers: ChunkedRMSprop is torch's RMSprop, update for update and state for state."""

import pytest
import torch

from preftune.config import TrainConfig
from preftune.train import optim


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (1000,), (3, 5, 7), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _run(opt_cls, params, steps=4, **kw):
    opt = opt_cls(params, lr=1e-2, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_chunked_rmsprop_is_bit_identical_to_torch(monkeypatch, weight_decay):
    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 64)  # several chunks per tensor, and a ragged last one
    a, b = _params(), _params()
    ta = _run(torch.optim.RMSprop, a, weight_decay=weight_decay)
    tb = _run(optim.ChunkedRMSprop, b, weight_decay=weight_decay)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        assert torch.equal(ta.state[x]["square_avg"], tb.state[y]["square_avg"])
        assert ta.state[x]["step"].item() == tb.state[y]["step"].item() == 4
    # the state_dicts are interchangeable (checkpoints written before this class resume with it)
    assert ta.state_dict()["param_groups"] == tb.state_dict()["param_groups"]
    fresh = optim.ChunkedRMSprop(_params(), lr=1e-2)
    fresh.load_state_dict(ta.state_dict())
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["square_avg"], ta.state[a[0]]["square_avg"])


def test_chunked_rmsprop_falls_back_to_torch_for_momentum_and_centered():
    """The fallback is torch's step, run once: step hooks fire once per step (the benchmark's clock counts them)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    a, b = _params(), _params()
    _run(torch.optim.RMSprop, a, momentum=0.9, centered=True)
    calls = []
    handle = register_optimizer_step_post_hook(lambda *args: calls.append(1))
    try:
        _run(optim.ChunkedRMSprop, b, momentum=0.9, centered=True)
        _run(optim.ChunkedRMSprop, _params(), steps=2)
    finally:
        handle.remove()
    assert len(calls) == 4 + 2
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_build_optimizer_picks_the_cpu_implementations():
    params = _params()
    rms = optim.build_optimizer(params, TrainConfig(optimizer="rmsprop", lr=1e-3))
    adamw = optim.build_optimizer(params, TrainConfig(optimizer="adamw", lr=1e-3))
    assert type(rms) is optim.ChunkedRMSprop
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True


def test_sgd_is_plain_gradient_descent():
    """train.optimizer=sgd: p <- p - lr * g, nothing that rescales the gradient (what the sharded-training tests
    rely on to see a gradient off by the number of processes)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = optim.build_optimizer([p], TrainConfig(optimizer="sgd", lr=0.5))
    p.grad = torch.tensor([0.2, 4.0])
    opt.step()
    assert p.detach().tolist() == pytest.approx([1.0 - 0.1, -2.0 - 2.0])


@pytest.mark.parametrize("max_norm, clips", [(0.0, False), (1e9, False), (0.5, True)])
def test_clipped_step_is_clip_grad_norm_bit_for_bit_and_skips_the_no_op_pass(monkeypatch, max_norm, clips):
    """train/loop.py: clipped_step updates exactly as torch's clip_grad_norm_ + step, but scales the gradients only
    when the coefficient is below 1 (torch multiplies by 1.0 every step: a pass over every gradient)."""
    import copy

    from preftune.train.loop import clipped_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    x = torch.randn(8, 16)
    for m in (model, twin):
        (m(x) * 3).square().sum().backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm if max_norm > 0 else float("inf"))
    torch.optim.SGD(twin.parameters(), lr=0.1).step()

    calls = []
    scale = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: (calls.append(1), scale(*a, **k)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    taken, norm = clipped_step(model.parameters(), optimizer, scheduler, max_norm)
    assert taken and torch.equal(norm, expected_norm) and (expected_norm > 0.5)
    assert len(calls) == (1 if clips else 0)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_clipped_step_skips_a_non_finite_gradient():
    from preftune.train.loop import clipped_step

    layer = torch.nn.Linear(4, 4)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.full((2, 4), float("nan"))).sum().backward()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    taken, norm = clipped_step(layer.parameters(), optimizer, scheduler, 1.0)
    assert not taken and not torch.isfinite(norm) and scheduler.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), before))
