"""The self-training-length benchmark (bench/bench_self_train.py): where each stop rule ends on a recorded run."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_self_train = pytest.importorskip("bench_self_train")
_report = pytest.importorskip("_report")

# a recorded run: the change of labels falls below 0.1 % at step 280, rises above it at 420, falls again at 560
UPDATES = [{"step": s, "acc": a, "delta_label": d, "seconds": s / 100}
           for s, a, d in [(0, 0.90, 1.0), (140, 0.91, 0.002), (280, 0.92, 0.0008), (420, 0.93, 0.0011),
                           (560, 0.94, 0.0004), (700, 0.95, 0.0002)]]


def test_each_rule_stops_at_its_first_quiet_update_at_or_after_min_iter():
    stop = bench_self_train.stop
    assert stop(UPDATES, 0)["step"] == 280  # the paper's rule: the first update after the start below tol
    assert stop(UPDATES, 300)["step"] == 560  # 420 changed 0.11 %: on to the next quiet update
    assert stop(UPDATES, 700)["step"] == 700
    assert stop(UPDATES, 701) is None  # the recorded run ends before that rule would stop


def test_the_report_gives_each_rule_its_final_acc_and_the_mean_gain(tmp_path, monkeypatch):
    monkeypatch.setattr(_report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(bench_self_train, "RESULTS", tmp_path / "self_train.jsonl")
    monkeypatch.setattr(bench_self_train, "MIN_ITERS", (0, 420))
    rows = [{"seed": s, "init_acc": 0.89, "updates": UPDATES, "update_interval": 140, "fit_minutes": 1.0,
             "machine": "test machine", "when": "now"} for s in (0, 1)]
    (tmp_path / "self_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench_self_train.report()
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| 0 | 0.89000 | 0.90000 | 0.92000 (step 280, 3 s) | 0.94000 (step 560, 6 s) |" in page
    assert "| mean final - init | | | +0.03000 | +0.05000 |" in page
