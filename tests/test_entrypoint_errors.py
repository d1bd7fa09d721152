"""User-caused failures through the real CLI: one line `Error: ...` naming the parameter or file, and
the MLflow run ends FAILED (never RUNNING).

Failures found before a stage starts its run are run through `mlflow run`, whose run is then the one
that must end FAILED; failures inside a run go through click's CliRunner in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import lifecycle, tracking
from dec_mlflow.cli import main
from serving.model_io import log_dec_model

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_clusters": 3, "hidden_dims": "16,8,3", "pretrain_epochs": 3, "pretrain_lr": 0.1, "pretrain_batch_size": 64,
         "batch_size": 64, "update_interval": 10, "n_init": 3, "precision": "fp32", "init": "kmeans"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary sqlite store, labelled blobs, an empty .npy and a fitted cluster run."""
    tmp = tmp_path_factory.mktemp("errors")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    (tmp / "empty.npy").write_bytes(b"")
    uri = f"sqlite:///{tmp}/mlflow.db"
    # one torch thread in the `mlflow run` processes too, as conftest.one_torch_thread does in this one
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "empty": str(tmp / "empty.npy"), "env": env}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def cluster_run(store):
    params = {**SMALL, "hidden_dims": (16, 8, 3)}
    return lifecycle.cluster(store["data"], registered_model_name="none", figure_sample_size=50, **params)


def all_runs():
    return MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                      order_by=["attributes.start_time ASC"])


def assert_one_line_error(output: str, expected: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[-1] == f"Error: {expected}", output[-2000:]
    assert "Traceback" not in output


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def mlflow_run(store, entry_point: str, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)


def command_output(proc: subprocess.CompletedProcess) -> str:
    """What the entry point's command printed on stderr: the lines between mlflow run's own log lines."""
    lines = proc.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "=== Running command" in line)
    end = next(i for i, line in enumerate(lines) if "=== Run (ID" in line)
    return "\n".join(lines[start + 1:end])


# ------------------------------------------------------------------ failures before a stage starts its run
@pytest.mark.parametrize("entry_point, params, expected", [
    ("cluster", {"dataset": "{empty}"}, "dataset '{empty}': the file is empty (0 bytes)"),
    ("evaluate", {"model": "models:/no-such-model/1", "dataset": "{data}"},
     "model 'models:/no-such-model/1' could not be loaded: Registered Model with name=no-such-model not found"),
    ("pretrain", {"dataset": "{data}", "device": "gpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
])
def test_failure_before_work_is_one_line_and_the_mlflow_run_is_failed(store, entry_point, params, expected):
    params = {k: v.format(**store) for k, v in params.items()}
    proc = mlflow_run(store, entry_point, **params)
    assert proc.returncode != 0
    assert_one_line_error(command_output(proc), expected.format(**store))
    latest = all_runs()[-1]
    assert latest.data.tags["mlflow.project.entryPoint"] == entry_point
    assert latest.info.status == "FAILED"


def test_empty_npy_is_refused_naming_the_file(store):
    result = invoke("pretrain", "--dataset", store["empty"])
    assert result.exit_code == 1
    assert result.output == f"Error: dataset '{store['empty']}': the file is empty (0 bytes)\n"


def test_truncated_npy_is_refused_naming_the_file(store, tmp_path):
    path = tmp_path / "truncated.npy"
    path.write_bytes(b"\x93NUMPY")  # a .npy magic string and nothing else
    result = invoke("pretrain", "--dataset", path)
    assert result.exit_code == 1 and result.output.startswith(f"Error: dataset '{path}': cannot read .npy file (")
    assert len(result.output.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_before_any_work(store):
    before = len(all_runs())
    for device in ("cuda", "cuda:1"):
        result = invoke("cluster", "--dataset", "not-loaded.npz", "--device", device)
        assert result.exit_code == 1
        assert_one_line_error(result.output, f"device='{device}' but CUDA is not available here (no GPU or driver, "
                                             "or a CPU-only torch); use device='auto' or 'cpu'")
    assert len(all_runs()) == before  # refused before loading data or starting a run


def test_export_of_a_run_that_does_not_exist_is_one_line(store):
    before = len(all_runs())
    result = invoke("export", "--run_id", "0123456789abcdef0123456789abcdef", "--dataset", store["data"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: run_id '0123456789abcdef0123456789abcdef' has no network/dec_network.pt")
    assert len(result.output.splitlines()) == 1
    assert len(all_runs()) == before


# ------------------------------------------------------------------ failures inside a run
@pytest.mark.parametrize("ref, expected", [
    ("0123456789abcdef0123456789abcdef", "autoencoder '0123456789abcdef0123456789abcdef' could not be loaded: Run "),
    ("models:/no-such-model/1", "autoencoder 'models:/no-such-model/1' could not be loaded: "),
    ("missing/autoencoder.pt", "autoencoder 'missing/autoencoder.pt': no such file"),
])
def test_cluster_with_a_missing_autoencoder_is_one_line_and_its_run_failed(store, ref, expected):
    args = ["cluster", "--dataset", store["data"], "--autoencoder", ref, "--registered_model_name", "none"]
    result = invoke(*args, *[a for k, v in SMALL.items() for a in (f"--{k}", v)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith(f"Error: {expected}") and "Traceback" not in result.output
    run = all_runs()[-1]
    assert run.data.tags[tracking.STAGE_TAG] == "cluster" and run.info.status == "FAILED"


def test_diverging_pretraining_is_one_line_naming_pretrain_lr_and_both_runs_failed(store):
    args = ["cluster", "--dataset", store["data"], "--registered_model_name", "none", "--random_state", "7"]
    result = invoke(*args, *[a for k, v in {**SMALL, "pretrain_lr": 1e30}.items() for a in (f"--{k}", v)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "pretrain_lr=1e+30" in lines[-1], result.output[-2000:]
    assert "Traceback" not in result.output
    cluster_run_, pretrain_run = [r for r in all_runs() if r.data.tags.get("seed") == "7"]
    assert cluster_run_.data.tags[tracking.STAGE_TAG] == "cluster" and cluster_run_.info.status == "FAILED"
    assert pretrain_run.data.tags[tracking.STAGE_TAG] == "pretrain" and pretrain_run.info.status == "FAILED"
    assert pretrain_run.data.tags["mlflow.parentRunId"] == cluster_run_.info.run_id


def test_evaluate_batches_rows_beyond_the_models_max_batch_rows(store, cluster_run):
    """A model that takes 128 rows per call still scores all 300 rows, like the unlimited model."""
    network = tracking.load_network(cluster_run["run_id"])
    x = np.load(store["data"])["x"]
    with mlflow.start_run(run_name="small-batches"):
        info, _ = log_dec_model(network, x[:100], max_batch_rows=128)
    small = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="batch has 300 rows; at most 128 are accepted"):
        small.predict(x.astype(np.float64))  # the limit is real
    result = invoke("evaluate", "--model", info.model_uri, "--dataset", store["data"], "--sample_size", "50")
    assert result.exit_code == 0, result.output
    run = all_runs()[-1]
    assert run.data.tags[tracking.STAGE_TAG] == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["acc"] == pytest.approx(cluster_run["metrics"]["final_acc"])
    sizes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/cluster_sizes.json")["cluster_sizes"]
    assert sum(sizes) == 300
