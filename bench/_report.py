"""Shared by the benchmarks: machine description, matmul peak, and BENCHMARKS.md sections."""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from dec_mlflow.callbacks import Callback

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def matmul_peak_gflops(dtype=torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of an n x n x n matmul: the machine's practical peak for ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def median(values) -> float:
    return float(statistics.median(values))


def latest_rows(path: Path, key: tuple[str, ...]) -> list[dict]:
    """The rows of a JSON-lines results file, the last one per ``key`` (a rerun replaces an earlier row)."""
    latest = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        latest[tuple(row[k] for k in key)] = row
    return list(latest.values())


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nWritten by the scripts under `bench/`; each section says the command that regenerates it.\n"
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")


class StageTimer(Callback):
    """Wall time per stage (``seconds``): the pretraining stages ('pretrain/...') added up; the parts of an
    open stage ('init/map' inside 'init') are timed as ``seconds['init/map']`` and not added to it twice."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._starts: dict[str, float] = {}

    def on_stage_begin(self, stage, total):
        self._starts[stage] = time.perf_counter()

    def on_stage_end(self, stage):
        elapsed = time.perf_counter() - self._starts.pop(stage, time.perf_counter())
        key = stage.split("/")[0]
        if key in self._starts:  # a part of a stage still open: kept on its own
            key = stage
        self.seconds[key] = self.seconds.get(key, 0.0) + elapsed
