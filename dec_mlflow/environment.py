"""Process environment variables set for one block of code (child processes, Spark, MLflow runs)."""

from __future__ import annotations

import os
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
