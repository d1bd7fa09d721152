"""The quality benchmark's read-back (bench/bench_quality.py): a page's table back into results, rerun rows replacing it."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_quality = pytest.importorskip("bench_quality")
_report = pytest.importorskip("_report")

PAGE = """# Benchmarks

## Clustering quality across data kinds

Machine: an earlier one.

### Every run

| dataset | recipe | seed | init ACC | ACC | NMI | ACC - init | minutes |
|---|---|---|---|---|---|---|---|
| wine | default | 0 | 0.9494 | **0.9494** | 0.835 | +0.0000 | 0.71 |
| wine | default | 1 | 0.9326 | **0.9326** | 0.795 | +0.0000 | 0.66 |
| wine | default | mean ± std (2) | 0.941 ± 0.008 | **0.941 ± 0.008** | 0.815 ± 0.020 | | 0.69 (median) |
| wine | baseline | 0 | - | **0.9326** | 0.795 | - | 0.01 |

## The next section

| a | b | c | d | e | f | g | 1 |
"""


def test_read_back_turns_the_runs_of_the_page_into_results_and_a_rerun_replaces_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(_report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(bench_quality, "OUT", tmp_path)
    monkeypatch.setattr(bench_quality, "RESULTS", tmp_path / "quality.jsonl")
    (tmp_path / "BENCHMARKS.md").write_text(PAGE)
    bench_quality.cmd_read_back(argparse.Namespace(commit="abc1234"))
    rows = [json.loads(line) for line in (tmp_path / "quality.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["recipe"], r["seed"]) for r in rows] == [("wine", "default", 0), ("wine", "default", 1),
                                                                     ("wine", "baseline", 0)]
    assert rows[0] | {"machine": None} == {"dataset": "wine", "recipe": "default", "seed": 0, "init_acc": 0.9494, "acc": 0.9494,
                                           "nmi": 0.835, "minutes": 0.71, "machine": None, "recorded": "abc1234"}
    assert rows[2]["init_acc"] is None and rows[2]["machine"] == "recorded at abc1234"
    with (tmp_path / "quality.jsonl").open("a") as f:  # a rerun of seed 1
        f.write(json.dumps({**rows[1], "acc": 0.95, "machine": "this one", "recorded": None}) + "\n")
    bench_quality.cmd_report(argparse.Namespace(note=""))
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| wine | default | 1 | 0.9326 | **0.9500** |" in page and "| wine | default | 0 | 0.9494 | **0.9494** |" in page
    assert "Machine: recorded at abc1234; this one." in page and "## The next section" in page
