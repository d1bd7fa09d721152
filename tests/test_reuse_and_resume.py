"""Reusing a pretrain run only when it is the same work, and resuming a killed one from its checkpoint."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import DEC, __version__, lifecycle

SMALL = {"n_clusters": 3, "hidden_dims": (16, 8, 3), "pretrain_epochs": 3, "pretrain_lr": 0.1, "pretrain_batch_size": 64,
         "batch_size": 64, "update_interval": 10, "n_init": 3, "precision": "fp32", "init": "kmeans"}
PRETRAIN_SMALL = {k: v for k, v in SMALL.items() if k in lifecycle.PRETRAIN_STAGE_PARAMS}
CPU_FP32 = {"precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reuse")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "env": env, "uri": uri}
    mlflow.set_tracking_uri(previous)


# ------------------------------------------------------------------------------------ the reuse key
def test_the_pretrain_key_holds_resolved_precision_device_type_and_package_version(monkeypatch):
    est = DEC(**SMALL)
    key = lifecycle._pretrain_key(est, "digest", CPU_FP32)
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "precision": "bf16"}) != key
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda"}) != key
    # which card does not change how the numbers are computed; cpu against cuda does
    assert lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda:1"}) == \
        lifecycle._pretrain_key(est, "digest", {**CPU_FP32, "device": "cuda"})
    monkeypatch.setattr(lifecycle, "PACKAGE_VERSION", "0.0.1")
    assert lifecycle._pretrain_key(est, "digest", CPU_FP32) != key


def test_a_pretrain_run_of_another_package_version_is_not_reused(store, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(lifecycle, "PACKAGE_VERSION", "0.0.1")
        old = lifecycle.pretrain(store["data"], experiment="versions", **PRETRAIN_SMALL)
    current = lifecycle.pretrain(store["data"], experiment="versions", **PRETRAIN_SMALL)
    params = {r: MlflowClient().get_run(r).data.params for r in (old["run_id"], current["run_id"])}
    assert params[old["run_id"]]["dec_mlflow_version"] == "0.0.1"
    assert params[current["run_id"]]["dec_mlflow_version"] == __version__
    assert params[current["run_id"]]["precision_resolved"] == "fp32" and params[current["run_id"]]["device_resolved"] == "cpu"
    result = lifecycle.cluster(store["data"], registered_model_name="none", figure_sample_size=50, experiment="versions", **SMALL)
    assert result["autoencoder_source"] == f"runs:/{current['run_id']}"  # the newest of this version's runs
    cluster_params = MlflowClient().get_run(result["run_id"]).data.params
    assert cluster_params["device_resolved"] == "cpu" and cluster_params["dec_mlflow_version"] == __version__
    monkeypatch.setattr(lifecycle, "PACKAGE_VERSION", "9.9.9")  # newer code: neither run may be reused
    result = lifecycle.cluster(store["data"], registered_model_name="none", figure_sample_size=50, experiment="versions", **SMALL)
    assert result["autoencoder_source"] not in (f"runs:/{old['run_id']}", f"runs:/{current['run_id']}")
    child = MlflowClient().get_run(result["autoencoder_source"].removeprefix("runs:/"))
    assert child.data.params["dec_mlflow_version"] == "9.9.9" and child.info.status == "FINISHED"
