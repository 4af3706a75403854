"""Stopping a run cleanly when the machine is taken away: SIGTERM and SIGUSR1 end it with a checkpoint.

SIGTERM (preemption, `timeout`, `kill`) and SIGUSR1 (SLURM's `--signal` warning before the kill) stop a run
cleanly. The handlers, set for the loop (main thread only; the previous ones are restored after), only
record the signal. The loop finishes the step it is in, writes a normal checkpoint at that step (unless that
step has just written its periodic one) without `Task.on_checkpoint`'s side work (validation and previews
take too long when a kill is coming), logs the step, closes the loader and the log, and exits with
SystemExit(128 + the signal number), 143 for SIGTERM, as a terminated process does: a study takes it as a
failed stage, so the job is not done and the next `study run` resumes it. A single process stops at the end
of the current step. Under torchrun the ranks must stop together (one stopping alone would leave the others
waiting in a collective), so the request rides on the all-reduce of the logs and every rank stops at the next
`log_every` step: keep log_every within the grace time before the kill. SLURM and `timeout` signal the whole
process group: torch's DataLoader workers would die of the SIGTERM and the main process then raise about them,
so batches are fetched with the stop signals blocked; the workers (forked by a fetch) inherit the block and
live on until the loader is closed.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_signals(record: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, STOP_SIGNALS only call `record(signum)` (the loop acts on it at a step
    boundary); the previous handlers are restored after. Outside the main thread, where Python can set
    no handler, the block runs without."""
    try:
        previous = {s: signal.signal(s, lambda signum, frame: record(signum)) for s in STOP_SIGNALS}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: a handler not set from Python, which cannot be restored
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def fetch_shielded(loader: Any) -> Any:
    """next(loader) with STOP_SIGNALS blocked: the loader's workers, forked by a fetch, inherit the mask, so a
    signal to the whole process group stays pending in them instead of killing them (and making torch raise
    here before the checkpoint); this process gets it when the fetch ends."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return next(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


__all__ = ["STOP_SIGNALS", "stop_signals", "fetch_shielded"]
