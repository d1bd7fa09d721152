"""The MLflow entry points end to end: `mlflow run . -e cluster` in a temporary tracking store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import mlflow
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import DEC
from dec_mlflow.cli import FLOAT_OR_AUTO, INT_OR_AUTO, main
from dec_mlflow.initialisation import VALLEY_DEPTH

REPO = Path(__file__).resolve().parents[1]
# Small network and short schedules so each run takes seconds; the same values are given to every
# call so the pretraining identity matches and the second call can reuse the first call's run.
SMALL = {
    "n_clusters": 3, "hidden_dims": "16,8,3", "pretrain_epochs": 10, "pretrain_lr": 0.3,
    "pretrain_batch_size": 64, "batch_size": 64, "update_interval": 10, "n_init": 3, "precision": "fp32",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary sqlite tracking store and a small labelled dataset in it."""
    tmp = tmp_path_factory.mktemp("e2e")
    x, y = make_blobs(300, n_features=12, centers=3, cluster_std=1.0, random_state=0)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    # one torch thread in the `mlflow run` processes too, as conftest.one_torch_thread does in this one
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "env": env, "uri": uri}
    mlflow.set_tracking_uri(previous)


def mlflow_run(store, entry_point: str, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return subprocess.run(args, cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)


def runs_by_stage(stage: str):
    exp = mlflow.get_experiment_by_name("Default")
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`dec.stage` = '{stage}'", order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def first_cluster(store):
    proc = mlflow_run(store, "cluster", dataset=store["data"], **SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs_by_stage("cluster")[-1], proc


def test_cluster_logs_params_metrics_artifacts_and_registers(store, first_cluster):
    run, proc = first_cluster
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.params["n_clusters"] == "3" and run.data.params["dataset_name"] == "blobs"
    assert run.data.params["hidden_dims"] == "16,8,3" and run.data.params["lr"] == "0.01"
    assert run.data.tags["dataset"] == "blobs" and run.data.tags["seed"] == "0"
    assert run.data.tags["mlflow.runName"] == "cluster-blobs-k3-s0"
    m = run.data.metrics
    assert m["final_acc"] > 0.95 and m["init_acc"] > 0.9 and m["converged"] == 1.0
    # the label-free trust score and its three parts: the true partition of separated blobs
    assert 0.0 <= m["trust_score"] <= 1.0
    assert m["trust_score"] == pytest.approx(m["trust_agreement"] * m["trust_modularity"] * m["trust_valleys"])
    assert m["trust_agreement"] > 0.95 and m["trust_modularity"] > 0.5 and m["trust_valleys"] == 1.0
    assert run.data.params["init_resolved"] == "manifold" and run.data.params["pretrain_lr_resolved"] == "0.3"
    assert run.data.params["distill_epochs"] == "auto" and run.data.params["distill_epochs_resolved"] == "25"
    assert run.data.params["distill_lr"] == "auto" and run.data.params["distill_lr_resolved"] == "0.01"  # pretrained
    assert run.data.params["distill_rounds"] == "auto" and run.data.params["distill_rounds_resolved"] == "1"
    assert run.data.params["scaling_resolved"] == "standard" and run.data.params["update_interval_resolved"] == "10"
    # per-update curves with steps
    kl = client.get_metric_history(run.info.run_id, "kl_loss")
    acc = client.get_metric_history(run.info.run_id, "acc")
    assert len(kl) >= 2 and [h.step for h in kl] == sorted(h.step for h in kl) and kl[1].step == 10
    assert len(acc) == len(kl)
    assert {f"cluster_{j}_frac" for j in range(3)} <= set(m)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cluster_sizes.json", "self_training_tsne.png", "self_training_curves.png", "gradient_vs_q.png"} <= artifacts
    sizes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/cluster_sizes.json")["cluster_sizes"]
    assert sum(sizes) == 300 and len(sizes) == 3
    # registered, loadable, and it clusters the data like the run says
    version = client.get_model_version("dec-blobs", "1")
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(f"models:/dec-blobs/{version.version}")
    data = np.load(store["data"])
    out = model.predict(data["x"][:50].astype(np.float64))
    assert list(out.columns[:1]) == ["label"] and out.shape == (50, 4)
    # the autoencoder came from a child pretrain run with its own loss curve and artifact
    pre = runs_by_stage("pretrain")
    assert len(pre) == 1 and pre[0].data.tags["mlflow.parentRunId"] == run.info.run_id
    assert len(client.get_metric_history(pre[0].info.run_id, "pretrain_loss")) == 10
    assert "autoencoder" in {a.path for a in client.list_artifacts(pre[0].info.run_id)}
    assert run.data.tags["dec.autoencoder_source"] == f"runs:/{pre[0].info.run_id}"


def test_second_cluster_run_reuses_the_finished_pretrain_run(store, first_cluster):
    proc = mlflow_run(store, "cluster", dataset=store["data"], **{**SMALL, "lr": 0.02})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre = runs_by_stage("pretrain")
    assert len(pre) == 1, "a matching pretrain run exists, none should be added"
    second = runs_by_stage("cluster")[-1]
    assert second.info.run_id != first_cluster[0].info.run_id
    assert second.data.tags["dec.autoencoder_source"] == f"runs:/{pre[0].info.run_id}"
    assert "Reusing autoencoder" in proc.stderr
    versions = MlflowClient().search_model_versions("name = 'dec-blobs'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_bad_parameter_fails_the_run_with_a_named_error(store):
    before = len(runs_by_stage("cluster"))
    proc = mlflow_run(store, "cluster", dataset=store["data"], lr="abc")
    assert proc.returncode != 0
    assert "Invalid value for '--lr': 'abc' is not a valid float" in proc.stderr
    assert "Traceback" not in proc.stderr.split("=== Running command")[-1].split("mlflow.exceptions")[0]
    exp = mlflow.get_experiment_by_name("Default")
    latest = MlflowClient().search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.info.status == "FAILED"
    assert len(runs_by_stage("cluster")) == before


def test_missing_dataset_is_reported_before_work(store):
    result = CliRunner().invoke(main, ["cluster", "--dataset", str(store["dir"] / "nope.npz")])
    assert result.exit_code == 1
    assert "nope.npz': no such file" in result.output


def test_cluster_with_auto_n_clusters_logs_the_choice_and_each_candidates_score(store, first_cluster):
    args = ["cluster", "--dataset", store["data"], "--registered_model_name", "none"]
    for k, v in {**SMALL, "n_clusters": "auto", "k_max": 6, "pretrain_epochs": 0}.items():  # the default recipe
        args += [f"--{k}", str(v)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = runs_by_stage("cluster")[-1]
    assert run.data.params["n_clusters"] == "auto" and run.data.params["n_clusters_resolved"] == "3"
    # the logged model's config reaches the run's params as with a given k (MLflow's own batch would clash on n_clusters)
    assert run.data.params["max_batch_rows"] == "100000" and run.data.params["device"] == "auto"
    depths = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, "k_valley_depth")}
    assert sorted(depths) == [2, 3, 4, 5, 6]
    assert depths[2] < VALLEY_DEPTH and depths[3] < VALLEY_DEPTH <= depths[4]  # two cuts across gaps, then none
    assert "k_selection.png" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert run.data.metrics["final_acc"] > 0.95
    # the user is told how k came about, and the run keeps the same sentence
    said = (f"n_clusters=auto chose k = 3: 3 clusters parted by density valleys below {VALLEY_DEPTH} in the map; "
            f"the first cut it does not support, to 4 clusters, has a valley of {depths[4]:.2f}")
    assert said in result.output and run.data.tags["dec.k_choice"].startswith(said)


def test_imbalance_refuses_auto_n_clusters_with_the_way_to_get_a_k(store):
    result = CliRunner().invoke(main, ["imbalance", "--dataset", store["data"], "--n_clusters", "auto"])
    assert result.exit_code == 1
    assert "n_clusters='auto' is for cluster, compare and the estimator; imbalance compares its methods at a" in result.output


def test_cluster_from_given_autoencoder_run_id(store, first_cluster):
    pre = runs_by_stage("pretrain")[0]
    args = ["cluster", "--dataset", store["data"], "--autoencoder", pre.info.run_id, "--registered_model_name", "none"]
    for k, v in {**SMALL, "random_state": 5}.items():
        args += [f"--{k}", str(v)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = runs_by_stage("cluster")[-1]
    assert run.data.tags["dec.autoencoder_source"] == pre.info.run_id
    assert run.data.metrics["final_acc"] > 0.95
    assert len(runs_by_stage("pretrain")) == 1


def test_evaluate_logs_scores_and_figures(store, first_cluster):
    result = CliRunner().invoke(main, ["evaluate", "--model", "models:/dec-blobs/1", "--dataset", store["data"],
                                       "--sample_size", "100"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = runs_by_stage("evaluate")[-1]
    assert run.data.metrics["acc"] == pytest.approx(first_cluster[0].data.metrics["final_acc"])
    paths = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "cluster_sizes.png", "embedding_tsne.png", "cluster_sizes.json"} <= paths
    assert "top_images_per_cluster.png" not in paths  # not image data


def test_promote_points_champion_at_the_best_version(store, first_cluster):
    result = CliRunner().invoke(main, ["promote", "--model_name", "dec-blobs"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    champion = client.get_model_version_by_alias("dec-blobs", "champion")
    best = max(client.search_model_versions("name = 'dec-blobs'"),
               key=lambda v: (client.get_run(v.run_id).data.metrics["final_acc"], int(v.version)))
    assert champion.version == best.version
    assert "dec-blobs@champion -> version" in result.output and "(no previous holder)" in result.output
    result = CliRunner().invoke(main, ["promote", "--model_name", "dec-blobs", "--metric", "nope"])
    assert result.exit_code == 1 and "metric 'nope' was not logged" in result.output


def test_promote_without_labels_picks_the_highest_trust_score(store):
    x = np.load(store["data"])["x"]
    np.save(store["dir"] / "unlabelled.npy", x)
    for seed in (0, 1):
        args = ["cluster", "--dataset", str(store["dir"] / "unlabelled.npy"), "--registered_model_name", "dec-unlabelled",
                "--random_state", str(seed), "--init", "kmeans", "--pretrain_epochs", "3"]
        args += [a for k, v in SMALL.items() if k != "pretrain_epochs" for a in (f"--{k}", str(v))]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "Trust score" in result.output and "DEC " not in result.output  # no labels, no accuracy
    result = CliRunner().invoke(main, ["promote", "--model_name", "dec-unlabelled"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    versions = client.search_model_versions("name = 'dec-unlabelled'")
    scores = {v.version: client.get_run(v.run_id).data.metrics["trust_score"] for v in versions}
    assert "final_acc" not in client.get_run(versions[0].run_id).data.metrics
    champion = client.get_model_version_by_alias("dec-unlabelled", "champion").version
    assert scores[champion] == max(scores.values())  # on a tie, either version is the right pick
    assert "trust_score=" in result.output


# `path` (score's input): mlflow run checks it exists and passes it on absolute; the option is a string
_MLPROJECT_TYPES = {"int": click.types.IntParamType, "float": click.types.FloatParamType,
                    "string": (click.types.StringParamType, click.Choice, type(INT_OR_AUTO), type(FLOAT_OR_AUTO)), "path": click.types.StringParamType}


def test_every_mlproject_entry_point_mirrors_its_command():
    """Each parameter is an option of the same name, type and default; each option a parameter; all passed."""
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert set(spec) == set(main.commands)
    for entry, s in spec.items():
        options = {p.name: p for p in main.commands[entry].params}
        assert set(s["parameters"]) == set(options), entry
        prefix = f"python -m dec_mlflow.cli {entry} "
        assert s["command"].startswith(prefix), entry
        passed = re.findall(r"--(\w+) \{(\w+)\}", s["command"])
        assert all(flag == name for flag, name in passed), entry
        assert sorted(name for _, name in passed) == sorted(s["parameters"]), entry  # each exactly once
        assert re.sub(r"--\w+ \{\w+\}", "", s["command"][len(prefix):]).strip() == "", entry  # nothing else
        for name, p in s["parameters"].items():
            option = options[name]
            assert isinstance(option.type, _MLPROJECT_TYPES[p["type"]]), (entry, name, option.type)
            if "default" in p:
                assert not option.required and str(option.default) == str(p["default"]), (entry, name, option.default, p["default"])
                if isinstance(option.type, click.Choice):
                    assert p["default"] in option.type.choices, (entry, name)
            else:
                assert option.required, (entry, name)


def test_cli_defaults_are_the_estimator_defaults():
    defaults = DEC().get_params()
    options = {p.name: p for p in main.commands["cluster"].params}
    assert set(defaults) <= set(options)
    # left to the dataset (scaling, image_shape) or to the preset (augment, init, pretrain_epochs, distill_epochs,
    # distill_rounds)
    stage_level = {"scaling": "auto", "image_shape": "", "augment": "auto", "init": "auto", "pretrain_epochs": "auto",
                   "distill_epochs": "auto", "distill_rounds": "auto"}
    for name, default in defaults.items():
        expected = ",".join(map(str, default)) if name == "hidden_dims" else stage_level.get(name, default)
        assert options[name].default == expected, name


def test_export_reexports_a_cluster_run_as_a_new_verified_version(store, first_cluster):
    run = first_cluster[0]
    result = CliRunner().invoke(main, ["export", "--run_id", run.info.run_id, "--dataset", store["data"],
                                       "--registered_model_name", "dec-blobs-export"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    export_run = runs_by_stage("export")[-1]
    assert export_run.data.tags["dec.network_source"] == f"runs:/{run.info.run_id}"
    assert export_run.data.metrics["onnx_max_abs_dq"] <= 1e-4 and export_run.data.metrics["onnx_labels_match"] == 1.0
    version = MlflowClient().get_model_version("dec-blobs-export", "1")
    assert version.tags["network_run"] == run.info.run_id
    x = np.load(store["data"])["x"].astype(np.float64)
    exported = mlflow.pyfunc.load_model("models:/dec-blobs-export/1").predict(x)
    original = mlflow.pyfunc.load_model("models:/dec-blobs/1").predict(x)
    np.testing.assert_array_equal(exported["label"], original["label"])
    result = CliRunner().invoke(main, ["export", "--run_id", "0123456789abcdef", "--dataset", store["data"]])
    assert result.exit_code == 1 and "run_id '0123456789abcdef'" in result.output


def test_parameter_errors_come_before_loading_data():
    result = CliRunner().invoke(main, ["cluster", "--dataset", "nope.npz", "--momentum", "1.5"])
    assert result.exit_code == 1 and "momentum must be a number >= 0.0 and < 1.0; got 1.5" in result.output
    result = CliRunner().invoke(main, ["pretrain", "--dataset", "nope.npz", "--hidden_dims", "500,x"])
    assert result.exit_code == 2 and "hidden_dims" in result.output and "'500,x'" in result.output
    result = CliRunner().invoke(main, ["cluster", "--dataset", "nope.npz", "--scaling", "minmax"])
    assert result.exit_code == 2 and "Invalid value for '--scaling'" in result.output
