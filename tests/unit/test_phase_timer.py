"""The fit loop's step-time breakdown, on the host clock (CPU) and with CUDA events (faked here: no GPU)."""

import pytest
import torch

from preftune.train import loop


class FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None
        self.synced = False

    def record(self):
        self.t = FakeEvent.clock

    def synchronize(self):
        self.synced = True

    def elapsed_time(self, end):  # milliseconds, as torch's
        return (end.t - self.t) * 1000.0


def test_phase_timer_cuda_events_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    host = iter([10.0, 10.05, 20.0, 20.07])  # the host clock at start() and at the data lap of each step
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(host))
    timer = loop.PhaseTimer(torch.device("cuda"))
    for _ in range(2):  # two steps: data on the host, then forward 0.2, backward 0.3, optimizer 0.1 of GPU time
        timer.start()
        timer.lap("data", host=True)
        for name, dt in (("forward", 0.2), ("backward", 0.3), ("optimizer", 0.1)):
            FakeEvent.clock += dt
            timer.lap(name)
        timer.steps += 1
    last_end = timer.pending[-1][2]
    out = timer.read()
    assert last_end.synced  # read once per window, at the last event
    assert out["time/forward_s"] == pytest.approx(0.2) and out["time/backward_s"] == pytest.approx(0.3)
    assert out["time/optimizer_s"] == pytest.approx(0.1) and out["time/data_s"] == pytest.approx((0.05 + 0.07) / 2)
    assert timer.read() == {}  # reset


def test_phase_timer_host_clock(monkeypatch):
    now = iter([0.0, 0.5, 1.5, 3.5, 4.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(now))
    timer = loop.PhaseTimer(torch.device("cpu"))
    timer.start()
    for name in ("data", "forward", "backward", "optimizer"):
        timer.lap(name)
    timer.steps += 1
    assert timer.read() == {"time/data_s": 0.5, "time/forward_s": 1.0, "time/backward_s": 2.0,
                            "time/optimizer_s": 0.5}
