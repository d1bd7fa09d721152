"""MLflow conventions of the lifecycle stages: datasets as run inputs, registry descriptions, named
experiments (the stage's `experiment` parameter, MLFLOW_EXPERIMENT_NAME, `mlflow run --experiment-name`).

Stages are called directly where that is simpler than going through click.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import lifecycle, tracking
from dec_mlflow.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_clusters": 3, "hidden_dims": (16, 8, 3), "pretrain_epochs": 3, "pretrain_lr": 0.1, "pretrain_batch_size": 64,
         "batch_size": 64, "update_interval": 10, "n_init": 3, "precision": "fp32", "init": "kmeans"}
PRETRAIN_SMALL = {k: v for k, v in SMALL.items() if k in lifecycle.PRETRAIN_STAGE_PARAMS}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("conventions")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    # one torch thread in the `mlflow run` processes too, as conftest.one_torch_thread does in this one
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "env": env}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def clustered(store):
    """cluster (pretraining in a child run), then evaluate, in the experiment 'lifecycle'."""
    result = lifecycle.cluster(store["data"], registered_model_name="dec-conventions", figure_sample_size=50,
                               experiment="lifecycle", **SMALL)
    evaluation = lifecycle.evaluate(result["model_uri"], store["data"], sample_size=50, experiment="lifecycle")
    return result, evaluation


def dataset_inputs(run_id: str) -> list[tuple[str, str, str, dict, str]]:
    """(name, digest, source, profile, context) of each dataset input of the run."""
    run = MlflowClient().get_run(run_id)
    return [(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"], json.loads(d.dataset.profile),
             next(t.value for t in d.tags if t.key == "mlflow.data.context")) for d in run.inputs.dataset_inputs]


def test_pretrain_cluster_and_evaluate_runs_log_the_data_as_a_dataset(store, clustered):
    result, evaluation = clustered
    cluster_run = MlflowClient().get_run(result["run_id"])
    digest = cluster_run.data.params["data_digest"]
    pretrain_run_id = result["autoencoder_source"].removeprefix("runs:/")
    for run_id, context in [(result["run_id"], "training"), (pretrain_run_id, "training"),
                            (evaluation["run_id"], "evaluation")]:
        [(name, dataset_digest, source, profile, logged_context)] = dataset_inputs(run_id)
        assert (name, dataset_digest, source, logged_context) == ("blobs", digest, store["data"], context)
        assert profile["features_shape"] == [300, 12] and profile["targets_shape"] == [300]
    schema = json.loads(cluster_run.inputs.dataset_inputs[0].dataset.schema)
    assert schema["mlflow_tensorspec"]["features"] == json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 12]}}])


def test_registered_model_and_version_carry_descriptions(clustered):
    result, _ = clustered
    client = MlflowClient()
    model = client.get_registered_model("dec-conventions")
    assert model.description.startswith("Deep Embedded Clustering (DEC) into 3 clusters, trained on 'blobs': rows of 12 raw features in")
    version = client.get_model_version("dec-conventions", result["registered_model_version"])
    acc = result["metrics"]["final_acc"]
    trust = result["metrics"]["trust_score"]
    assert f"run {result['run_id']} (cluster-blobs-k3-s0) scored trust_score {trust:.4f}, final_acc {acc:.4f}" in version.description
    assert "Trained on 'blobs' (300 x 12, data digest " in version.description and "max |dq|" in version.description


def test_export_version_describes_its_source_cluster_run(store, clustered):
    result, _ = clustered
    exported = lifecycle.export(result["run_id"], store["data"], registered_model_name="dec-conventions", experiment="lifecycle")
    version = MlflowClient().get_model_version("dec-conventions", exported["registered_model_version"])
    assert f"cluster run {result['run_id']}, re-exported by run {exported['run_id']}" in version.description
    assert f"final_acc {result['metrics']['final_acc']:.4f}" in version.description
    assert dataset_inputs(exported["run_id"])[0][4] == "validation"


def test_a_stage_and_its_child_runs_land_in_the_named_experiment(clustered):
    result, evaluation = clustered
    experiment = mlflow.get_experiment_by_name("lifecycle")
    client = MlflowClient()
    pretrain_run_id = result["autoencoder_source"].removeprefix("runs:/")
    for run_id in (result["run_id"], pretrain_run_id, evaluation["run_id"]):
        assert client.get_run(run_id).info.experiment_id == experiment.experiment_id
    assert client.get_run(pretrain_run_id).data.tags["mlflow.parentRunId"] == result["run_id"]


def test_mlflow_experiment_name_is_honoured_by_the_cli(store):
    result = CliRunner().invoke(main, ["pretrain", "--dataset", store["data"], "--pretrain_epochs", "2", "--random_state", "3"],
                                env={"MLFLOW_EXPERIMENT_NAME": "from-env"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    experiment = mlflow.get_experiment_by_name("from-env")
    [run] = MlflowClient().search_runs([experiment.experiment_id])
    assert run.info.run_name == "pretrain-blobs-s3" and run.info.status == "FINISHED"


def mlflow_run(store, *args, **params) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "pretrain", "--env-manager", "local", *args]
    for key, value in {"dataset": store["data"], "pretrain_epochs": 2, **params}.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)


def test_mlflow_run_experiment_name_and_experiment_parameter_both_name_the_experiment(store):
    client = MlflowClient()
    proc = mlflow_run(store, "--experiment-name", "by-mlflow-run", random_state=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = client.search_runs([mlflow.get_experiment_by_name("by-mlflow-run").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "pretrain"
    assert "pretrain_loss" in run.data.metrics and tracking.LAUNCHER_TAG not in run.data.tags

    # -P experiment: `mlflow run` made its run in Default before the command saw the parameter
    proc = mlflow_run(store, random_state=5, experiment="by-parameter")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = client.search_runs([mlflow.get_experiment_by_name("by-parameter").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain-blobs-s5" and "pretrain_loss" in run.data.metrics
    assert run.data.tags["mlflow.project.entryPoint"] == "pretrain"  # the project's source tags came along
    launcher = client.get_run(run.data.tags[tracking.LAUNCHER_TAG])
    assert launcher.info.experiment_id == mlflow.get_experiment_by_name("Default").experiment_id
    assert launcher.info.status == "FINISHED" and launcher.data.tags[tracking.LAUNCHED_TAG] == run.info.run_id
    assert "--experiment-name by-parameter" in launcher.data.tags["mlflow.note.content"]


def test_pretrain_stage_returns_its_run_and_a_loadable_autoencoder(store):
    result = lifecycle.pretrain(store["data"], experiment="lifecycle", random_state=9, **PRETRAIN_SMALL)
    run = MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "pretrain-blobs-s9"
    assert run.data.params["hidden_dims"] == "16,8,3" and run.data.params["scaling_resolved"] == "standard"
    assert run.data.metrics["final_pretrain_loss"] == pytest.approx(result["loss"])
    assert tracking.load_autoencoder(result["autoencoder_uri"]).loss == pytest.approx(result["loss"])
    with pytest.raises(ValueError, match="unknown parameter.s. n_clusters; this stage takes hidden_dims, scaling"):
        lifecycle.pretrain(store["data"], n_clusters=3)


def test_self_training_curves_of_later_rounds_continue_the_steps_and_each_stage_logs_its_wall_time(store):
    # two rounds of distillation then self-training: the second round's kl_loss steps follow the first's
    small = {**SMALL, "init": "manifold", "distill_rounds": 2}
    with mlflow.start_run(experiment_id=mlflow.create_experiment("rounds")) as run:
        callback = tracking.MlflowCallback(3)
        est = lifecycle.build_estimator(small).fit(np.load(store["data"])["x"], callback=callback)
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "kl_loss")]
    assert len(est.round_labels_) == 2 and len(steps) >= 2
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    seconds = {k[len("stage_seconds_"):]: v for k, v in MlflowClient().get_run(run.info.run_id).data.metrics.items()
               if k.startswith("stage_seconds_")}
    assert {"init", "init_map", "distill", "self_train", "trust"} <= set(seconds) and min(seconds.values()) >= 0
    assert seconds["trust"] > 0 and seconds["self_train"] > 0
    distill = MlflowClient().get_metric_history(run.info.run_id, "stage_seconds_distill")
    assert len(distill) == 2 and distill[1].value >= distill[0].value  # the second round adds to the first
