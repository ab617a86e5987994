"""Preemption and Ctrl-C while training.

The first SIGTERM or SIGINT is only noted: the optimizer step in progress finishes, the loop writes a checkpoint
(and the metrics logged so far are already on disk) and raises :class:`~preftune.errors.Interrupted`, which the CLI
turns into exit status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). ``--resume`` then continues as
if nothing happened. A second signal aborts at once (KeyboardInterrupt): whatever is being written is abandoned,
and the previous checkpoint, published atomically, stays intact.

Several processes stop at the same step: each asks the others once per step (one tiny all-reduce), so a signal
delivered to any of them stops them all after the same optimizer step.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """A context manager: while active, SIGTERM/SIGINT are caught and :meth:`requested` reports them."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt  # the second signal: abort now
        self.signum = signum
        log.warning("%s received: finishing this step, then writing a checkpoint and stopping (send it again to "
                    "abort at once)", signal.Signals(signum).name)

    def requested(self, procs=None) -> int:
        """The signal that asked this run (on any process) to stop, or 0."""
        if procs is not None and procs.world > 1:
            return int(procs.gather(torch.tensor([self.signum], dtype=torch.int64)).max())
        return self.signum


def stop_run(signum: int, step: int, run_dir, save=None) -> None:
    """The run was asked to stop after ``step``: ``save()`` a checkpoint (None: one was just written) and raise
    :class:`~preftune.errors.Interrupted`."""
    from preftune.errors import Interrupted

    if save is not None:
        save()
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint written; "
                              f"continue with --resume {run_dir}")
