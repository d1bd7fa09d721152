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


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM (what ``timeout``, batch schedulers and Kubernetes send) raises :class:`Stopped` for the block.

    Python's default for SIGTERM is to die at once, leaving MLflow runs RUNNING. Once only: a second
    SIGTERM while the first unwinds ends the process the default way. Main thread only (``signal``'s rule).
    """
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
