"""The process environment around one block of code: environment variables (child processes, Spark,
MLflow runs) and the stop signal."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def temporary_environ(values: dict[str, str]) -> Iterator[None]:
    """Set these environment variables for the block, then restore the previous environment."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stopped(KeyboardInterrupt):
    """The process was told to stop by ``signum`` (SIGTERM, or SIGINT through torchrun's launcher).

    A KeyboardInterrupt, as Ctrl-C raises: code that ends its MLflow runs KILLED on an interrupt
    (``tracking.stage_run``) does so for both.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_requested: int | None = None  # the stop signal received inside :func:`stop_signals`, until the block ends


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` if a stop signal arrived in this :func:`stop_signals` block.

    A signal raises its exception wherever the main thread is; a library that catches every exception
    there (a retry loop, a bare ``except``) can swallow it, and the job would run to its end. The
    training loops' hooks call this at every step, so a swallowed stop is raised again at the next one.
    """
    if _requested is not None:
        raise Stopped(_requested)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM (what ``timeout``, batch schedulers and Kubernetes send) and SIGINT (Ctrl-C) raise
    :class:`Stopped` for the block, and :func:`raise_if_stopped` raises it again at the next training step.

    Python's default for SIGTERM is to die at once, leaving MLflow runs RUNNING. Once only: a second
    signal while the first unwinds ends the process the default way (SIGINT: a KeyboardInterrupt).
    Main thread only (``signal``'s rule).
    """
    global _requested

    def stop(signum, frame):
        global _requested
        _requested = signum
        signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        _requested = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
