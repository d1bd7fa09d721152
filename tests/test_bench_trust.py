"""The trust benchmark's report (bench/bench_trust.py): pools scored now and pools read back from an earlier page."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
bench_trust = pytest.importorskip("bench_trust")
_report = pytest.importorskip("_report")


def run(dataset: str, tag: str, k: int, acc: float, score: float, **extra) -> dict:
    return {"dataset": dataset, "tag": tag, "k": k, "true_k": 3, "seed": 0, "acc": acc, "score": score,
            "agreement": 1.0, "modularity": score, "valleys": 1.0, "size_entropy": 0.9, "score_seconds": 1.0,
            "run_minutes": 1.0, "machine": "test machine", "when": "now", **extra}


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setattr(_report, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(bench_trust, "RESULTS", tmp_path / "trust.jsonl")
    monkeypatch.setattr(bench_trust, "FIGURE", tmp_path / "trust.png")
    return tmp_path


def test_a_pool_read_back_from_an_earlier_page_keeps_its_summary_and_a_scored_pool_is_summarised_anew(page):
    kept = "| wine | 3 | +0.94 | 0.96 of 46 | +0.283 | +0.172 / +0.176 | +0.73, 0.85 | +0.79, 0.87 | 6.8% |"
    recorded = dict(size_entropy=None, run_minutes=0.0, recorded="an earlier page", recorded_summary=kept)
    rows = [run("wine", "s0", 3, 0.93, 0.60, **recorded), run("wine", "k-1", 2, 0.60, 0.30, **recorded),
            run("blobs3", "s0", 3, 1.00, 0.57), run("blobs3", "s1", 3, 0.99, 0.56), run("blobs3", "k-1", 2, 0.66, 0.20)]
    (page / "trust.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench_trust.report(note="Two pools.")
    text = (page / "BENCHMARKS.md").read_text()
    assert kept in text  # as it was computed from the full rows, not from the rounded ones read back
    # the scored pool: 3 runs whose score follows ACC, one merged run below both good ones
    assert "| blobs3 | 3 | +1.00 | 1.00 of 2 | +0.365 | +0.360 / +0.370 |" in text
    assert "Two pools." in text and (page / "trust.png").exists()
    assert "| wine | k-1 | 2 | 0 | 0.6000 | 0.3000 |" in text  # every run is still listed


@pytest.mark.parametrize("k, stand_ins", [(2, ["k+1s1", "k+2s1", "k+3"]), (3, ["k+1s1"]), (4, []), (10, [])])
def test_every_pool_holds_12_runs_with_stand_ins_only_where_k_is_too_small_for_k_minus_2(k, stand_ins):
    runs = bench_trust.configs(k)
    assert len(runs) == bench_trust.POOL_RUNS == 12
    assert [t for t in runs if t in bench_trust.STAND_INS] == stand_ins
    assert all(p["n_clusters"] >= 2 for p in runs.values())
    assert [runs[t]["n_clusters"] for t in ("s0", "s1", "s2")] == [k] * 3
    # no two runs repeat the same parameters: each stand-in is a run the pool did not have
    assert len({tuple(sorted(p.items())) for p in runs.values()}) == 12
