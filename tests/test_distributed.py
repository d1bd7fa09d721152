"""Data-parallel training: two gloo processes on the CPU against one process, and `cluster --nproc 2` end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from distributed_ranks import FIT, blobs, distilled, one_update, rank_job
from dec_mlflow import DEC
from dec_mlflow.cli import main

REPO = Path(__file__).resolve().parents[1]
# the CLI runs of this module: a tiny network, k-means (no UMAP compilation), t-SNE figures of 10 points
CLI = {"n_clusters": "3", "hidden_dims": "16,8,3", "pretrain_epochs": "10", "pretrain_lr": "0.1", "pretrain_batch_size": "64",
       "batch_size": "64", "update_interval": "10", "n_init": "3", "precision": "fp32", "init": "kmeans",
       "figure_sample_size": "10"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(rank_job, args=(2, str(folder)), nprocs=2)
    return [dict(np.load(folder / f"rank{r}.npz")) for r in range(2)]


def test_both_ranks_end_with_identical_weights_and_centroids(two_ranks):
    first, second = two_ranks
    assert set(first) == set(second) and any(k.startswith("w_encoder") for k in first)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_two_ranks_train_as_one_process_would(two_ranks):
    """Same batches split across ranks, gradients summed: the same fit up to float rounding, stopping at the same iteration."""
    dec = DEC(**FIT).fit(blobs())
    ranked = two_ranks[0]
    assert int(ranked["n_iter"]) == dec.n_iter_
    np.testing.assert_array_equal(ranked["labels"], dec.labels_)
    np.testing.assert_allclose(ranked["centers"], dec.cluster_centers_, atol=1e-3)
    assert float(ranked["pretrain_loss"]) == pytest.approx(dec.pretrain_loss_, rel=1e-4)
    assert float(ranked["kl"]) == pytest.approx(dec.kl_loss_, rel=1e-3)


def test_target_distribution_of_two_ranks_equals_one_process(two_ranks):
    """f_j summed over the ranks' blocks: P of every row is the one-process P of the whole data."""
    single = one_update(blobs())
    for ranked in two_ranks:
        np.testing.assert_allclose(ranked["p"], single.p.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ranked["q"], single.q.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ranked["update_labels"], single.labels)


def test_distillation_of_two_ranks_equals_one_process(two_ranks):
    torch.manual_seed(5)
    single = distilled(blobs())
    for ranked in two_ranks:
        np.testing.assert_allclose(ranked["distilled"], single, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ the CLI with torchrun
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp-store")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "env": env}
    mlflow.set_tracking_uri(previous)


def _cli(store, stage: str, **options) -> list[str]:
    args = [sys.executable, "-m", "dec_mlflow.cli", stage, "--dataset", store["data"]]
    for key, value in {**CLI, **options}.items():
        args += [f"--{key}", str(value)]
    return args


def _runs(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], "", order_by=["attributes.start_time ASC"])


@pytest.mark.parametrize("stage", ["pretrain", "cluster"])
def test_nproc_below_one_is_refused_before_loading_data(stage):
    result = CliRunner().invoke(main, [stage, "--dataset", "nope.npz", "--nproc", "0"])
    assert result.exit_code == 1 and "Error: nproc must be an integer >= 1; got 0" in result.output


def _stop(proc: subprocess.Popen) -> None:
    """End a command that is still running with SIGTERM, on which torchrun stops its ranks (SIGKILL would orphan them)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cluster_with_two_processes_writes_one_finished_run_and_one_version(store):
    args = _cli(store, "cluster", nproc=2, experiment="ddp", registered_model_name="dec-ddp")
    proc = subprocess.Popen(args, cwd=store["dir"], env=store["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr[-3000:]
    runs = _runs("ddp")
    stages = sorted(r.data.tags["dec.stage"] for r in runs)
    assert stages == ["cluster", "pretrain"]  # the cluster run and the pretrain run it started: one each
    assert all(r.info.status == "FINISHED" for r in runs)
    run = next(r for r in runs if r.data.tags["dec.stage"] == "cluster")
    assert run.data.params["nproc"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.tags["mlflow.runName"] == "cluster-blobs-k3-s0"
    assert run.data.metrics["final_acc"] > 0.95
    client = MlflowClient()
    kl = client.get_metric_history(run.info.run_id, "kl_loss")
    assert len(kl) == len({m.step for m in kl}) >= 2  # one value per target update, not one per rank
    pretrain_run = next(r for r in runs if r.data.tags["dec.stage"] == "pretrain")
    assert len(client.get_metric_history(pretrain_run.info.run_id, "pretrain_loss")) == 10
    versions = client.search_model_versions("name = 'dec-ddp'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert stdout.count("registered as dec-ddp version 1") == 1  # rank 0 alone reports


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun started under ``parent`` (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_a_rank_killed_mid_training_ends_the_run_failed(store):
    args = _cli(store, "cluster", nproc=2, experiment="ddp-crash", pretrain_epochs=100000, registered_model_name="none")
    proc = subprocess.Popen(args, cwd=store["dir"], env=store["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while True:  # until both ranks train: the pretrain run has logged an epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            exp = mlflow.get_experiment_by_name("ddp-crash")
            runs = _runs("ddp-crash") if exp else []
            if any("pretrain_loss" in r.data.metrics for r in runs):
                break
            time.sleep(0.5)
        ranks = _worker_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 1
    assert "Error: training process rank 1 of 2 failed (signal SIGKILL)" in stderr
    runs = _runs("ddp-crash")
    assert sorted(r.data.tags["dec.stage"] for r in runs) == ["cluster", "pretrain"]
    assert all(r.info.status == "FAILED" for r in runs), [(r.data.tags["dec.stage"], r.info.status) for r in runs]
