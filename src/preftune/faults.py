"""Fault injection for the crash-safety tests.

``PREFTUNE_FAULT=after_step:N`` kills the process with SIGKILL right after optimizer step N;
``PREFTUNE_FAULT=mid_save:N`` kills it half-way through writing the checkpoint of step N;
``PREFTUNE_FAULT=sigterm:N`` / ``sigint:N`` send SIGTERM / SIGINT after step N, ``sigint_mid_save:N`` a SIGINT
half-way through that checkpoint;
``PREFTUNE_FAULT=nan_loss:N`` makes the loss of optimizer step N NaN (``nan_loss:N+``: of step N and every later
one), a real NaN through the backward. ``@R`` after the step: only in the process of rank R (``sigterm:3@1``).
Several faults: comma-separated. Unset in normal
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


# a fault's name -> (the point in the code where it strikes, the signal it sends)
_FAULTS = {"after_step": ("after_step", signal.SIGKILL), "mid_save": ("mid_save", signal.SIGKILL),
           "sigterm": ("after_step", signal.SIGTERM), "sigint": ("after_step", signal.SIGINT),
           "sigint_mid_save": ("mid_save", signal.SIGINT), "nan_loss": ("nan_loss", None)}


def _asked(point: str) -> list:
    """The signals (None for a non-signal fault) the faults asked for at ``point`` and the current step."""
    out = []
    for spec in filter(None, os.environ.get("PREFTUNE_FAULT", "").split(",")):
        name, _, step = spec.partition(":")
        step, _, rank = step.partition("@")  # "sigterm:3@1": only the process of rank 1
        where, sig = _FAULTS.get(name, (None, None))
        if where != point or (rank and rank != os.environ.get("RANK", "0")):
            continue
        if not step or (step.endswith("+") and _current_step >= int(step[:-1])) or step == str(_current_step):
            out.append(sig)
    return out


def active(point: str) -> bool:
    """Whether a fault is asked for at ``point`` and the current step (False in normal use)."""
    return "PREFTUNE_FAULT" in os.environ and bool(_asked(point))


def maybe_fault(point: str) -> None:
    """Send this process the signal of every fault asked for at ``point`` and the current step (real signals,
    delivered to the real handlers)."""
    if "PREFTUNE_FAULT" not in os.environ:
        return
    for sig in _asked(point):
        os.kill(os.getpid(), sig)
