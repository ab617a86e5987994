"""Fault injection for the crash-safety tests.

``PREFTUNE_FAULT=after_step:N`` kills the process with SIGKILL right after optimizer step N;
``PREFTUNE_FAULT=mid_save:N`` kills it half-way through writing the checkpoint of step N. Unset in normal
use, so these are no-ops. They exist because "a killed run resumes to the same weights" and "a crash
mid-save leaves the previous checkpoint usable" are promises that need a deterministic test.
"""

from __future__ import annotations

import os
import signal

_current_step = 0


def set_step(step: int) -> None:
    global _current_step
    _current_step = step


def maybe_fault(point: str) -> None:
    spec = os.environ.get("PREFTUNE_FAULT")
    if not spec:
        return
    name, _, step = spec.partition(":")
    if name == point and (not step or int(step) == _current_step):
        os.kill(os.getpid(), signal.SIGKILL)
