"""The experiment entry points end to end on small data: compare, k_sweep, imbalance."""

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

from dec_mlflow.cli import main
from dec_mlflow.initialisation import VALLEY_DEPTH

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden_dims", "16,8,3", "--pretrain_epochs", "10", "--pretrain_lr", "0.1", "--pretrain_batch_size", "64",
         "--batch_size", "64", "--update_interval", "10", "--n_init", "3", "--precision", "fp32", "--init", "kmeans"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary sqlite store; blobs with 4 classes of unequal spread, saved with labels."""
    tmp = tmp_path_factory.mktemp("experiments")
    x, y = make_blobs(400, n_features=12, centers=4, cluster_std=1.0, random_state=1)
    np.savez(tmp / "blobs.npz", x=x.astype(np.float32), y=y)
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    # one torch thread in the `mlflow run` processes too, as conftest.one_torch_thread does in this one
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    yield {"dir": tmp, "data": str(tmp / "blobs.npz"), "uri": uri, "env": env}
    mlflow.set_tracking_uri(previous)


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def runs(stage: str):
    exp = mlflow.get_experiment_by_name("Default")
    return MlflowClient().search_runs([exp.experiment_id], f"tags.`dec.stage` = '{stage}'", order_by=["attributes.start_time ASC"])


def artifact_text(run_id: str, path: str) -> str:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)).read_text()


@pytest.fixture(scope="module")
def compared(store):
    args = ["--dataset", store["data"], "--seeds", "0,1", "--n_clusters", "4", "--idec_lr", "0.05", "--idec_momentum", "0.9", *SMALL]
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "compare", "--env-manager", "local",
                           *[f"-P{a[2:]}={b}" for a, b in zip(args[::2], args[1::2])]],
                          cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs("compare")[-1], proc


def test_compare_logs_a_child_run_per_method_and_seed(compared):
    parent, _ = compared
    children = runs("compare/method")
    assert sorted((c.data.tags["method"], c.data.tags["seed"]) for c in children) == sorted(
        (m, s) for m in ("kmeans", "ae_kmeans", "dec_frozen", "dec", "idec") for s in ("0", "1"))
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(0 <= c.data.metrics["acc"] <= 1 for c in children)
    dec = next(c for c in children if c.data.tags["method"] == "dec")
    assert len(MlflowClient().get_metric_history(dec.info.run_id, "delta_label")) >= 2  # self-training curves
    assert "self_training_tsne.png" in {a.path for a in MlflowClient().list_artifacts(dec.info.run_id)}
    # one pretrain run per seed, nested under the parent
    pretrains = runs("pretrain")
    assert sorted(r.data.params["random_state"] for r in pretrains) == ["0", "1"]


def test_compare_parent_logs_table_markdown_and_stability(compared):
    parent, proc = compared
    table = json.loads(artifact_text(parent.info.run_id, "comparison_table.json"))
    assert [row[table["columns"].index("method")] for row in table["data"]] == ["kmeans", "ae_kmeans", "dec_frozen", "dec", "idec"]
    md = artifact_text(parent.info.run_id, "comparison.md")
    assert "| DEC |" in md and "| IDEC |" in md and "## Stability" in md
    stability = json.loads(artifact_text(parent.info.run_id, "stability.json"))
    assert stability["n_seeds"] == 2 and stability["selected_by_reconstruction"]["n_subsets"] == 1
    assert 0 <= parent.data.metrics["dec_acc_mean"] <= 1 and "dec_acc_std" in parent.data.metrics
    assert "| DEC |" in proc.stdout


def test_compare_names_the_run_it_would_keep_without_labels(compared):
    parent, _ = compared
    choice = json.loads(artifact_text(parent.info.run_id, "run_choice.json"))
    dec = {c.data.tags["seed"]: c.data.metrics for c in runs("compare/method") if c.data.tags["method"] == "dec"}
    by_trust = max(dec, key=lambda s: dec[s]["trust_score"])
    by_acc = max(dec, key=lambda s: dec[s]["acc"])
    assert (str(choice["label_free_seed"]), str(choice["by_labels_seed"])) == (by_trust, by_acc)
    assert parent.data.metrics["label_free_seed"] == float(by_trust)
    md = artifact_text(parent.info.run_id, "comparison.md")
    assert f"Without labels, keep seed {by_trust} of DEC" in md and f"labels would pick seed {by_acc}" in md


def test_compare_with_auto_n_clusters_resolves_one_k_for_every_method_and_seed(store):
    small = [a for a in SMALL[:-2]]  # the default init: n_clusters=auto chooses k in the input's map
    result = invoke("compare", "--dataset", store["data"], "--seeds", "0", "--select_from", "1", "--methods", "kmeans,dec", "--n_clusters", "auto",
                    "--k_max", "6", *small)
    assert result.exit_code == 0, result.output
    parent = runs("compare")[-1]
    k = int(parent.data.params["n_clusters_resolved"])
    assert parent.data.params["n_clusters"] == "auto" and f"n_clusters=auto chose k = {k}: " in result.output
    assert parent.data.tags["dec.k_choice"] in result.output
    depths = {m.step: m.value for m in MlflowClient().get_metric_history(parent.info.run_id, "k_valley_depth")}
    assert sorted(depths) == [2, 3, 4, 5, 6] and all(depths[j] < VALLEY_DEPTH for j in range(2, k + 1))
    assert k == 6 or depths[k + 1] >= VALLEY_DEPTH  # the first cut the map does not support ends the count
    children = [c for c in runs("compare/method") if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert sorted(c.data.tags["method"] for c in children) == ["dec", "kmeans"]
    for c in children:
        assert c.data.params["n_clusters"] == str(k)
        assert len(json.loads(artifact_text(c.info.run_id, "cluster_sizes.json"))["cluster_sizes"]) == k


def test_compare_rejects_unknown_methods_before_work(store):
    before = len(runs("compare"))
    result = invoke("compare", "--dataset", store["data"], "--methods", "dec,gmm")
    assert result.exit_code == 1 and result.output == (
        "Error: methods must be a comma-separated subset of kmeans, ae_kmeans, dec_frozen, dec, idec; got 'dec,gmm'\n")
    result = invoke("compare", "--dataset", store["data"], "--seeds", "0", "--select_from", "2")
    assert result.exit_code == 1 and result.output == "Error: select_from must be >= 1 and <= the number of seeds (1); got 2\n"
    result = invoke("compare", "--dataset", store["data"], "--seeds", "0,x")
    assert result.exit_code == 2 and "Invalid value for '--seeds': must be comma-separated integers; got '0,x'" in result.output
    assert len(runs("compare")) == before


def test_k_sweep_logs_g_and_nmi_per_k_and_recommends_one(store):
    result = invoke("k_sweep", "--dataset", store["data"], "--ks", "3,4,5", "--validation_fraction", "0.25", *SMALL)
    assert result.exit_code == 0, result.output
    parent = runs("k_sweep")[-1]
    history = MlflowClient().get_metric_history(parent.info.run_id, "generalizability")
    assert sorted(m.step for m in history) == [3, 4, 5] and all(m.value > 0 for m in history)
    assert [m.step for m in MlflowClient().get_metric_history(parent.info.run_id, "val_nmi")] == [3, 4, 5]
    depths = {m.step: m.value for m in MlflowClient().get_metric_history(parent.info.run_id, "map_valley_depth")}
    assert sorted(depths) == [3, 4, 5]
    # recommended by n_clusters=auto's cuts of the map of this (10-epoch, 3-d) embedding of three blobs; G's beside it
    assert depths[3] < VALLEY_DEPTH <= depths[4]
    best = 3
    assert parent.data.metrics["recommended_k"] == best
    assert parent.data.metrics["recommended_k_generalizability"] in (3, 4, 5)
    assert "k_sweep.png" in {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    children = runs("k_sweep/k")
    assert sorted(c.data.tags["n_clusters"] for c in children) == ["3", "4", "5"]
    # the autoencoder was pretrained once, on the training split only
    pretrain = [r for r in runs("pretrain") if r.data.params.get("dataset_name") == "blobs-train"]
    assert len(pretrain) == 1 and pretrain[0].data.params["n_samples"] == "300"
    assert f"Recommended k = {best} (n_clusters=auto's cuts of the map; the paper's G" in result.output


def test_imbalance_subsamples_per_r_min_and_logs_curves(store):
    result = invoke("imbalance", "--dataset", store["data"], "--n_clusters", "4", "--r_mins", "0.3,0.8", *SMALL)
    assert result.exit_code == 0, result.output
    parent = runs("imbalance")[-1]
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "dec_acc")] == [30, 80]
    assert {"imbalance.png", "imbalance.md", "imbalance.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = runs("imbalance/r_min")
    sizes = {c.data.tags["r_min"]: json.loads(artifact_text(c.info.run_id, "class_sizes.json"))["class_sizes"] for c in children}
    assert sizes["0.3"][0] < 0.5 * sizes["0.3"][-1]  # class 0 kept at ~30 %, the last class whole
    assert sizes["0.8"][-1] == 100
    assert "| DEC |" in result.output


def test_imbalance_needs_labels(store, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32))
    result = invoke("imbalance", "--dataset", tmp_path / "x.npy", "--n_clusters", "2")
    assert result.exit_code == 1 and result.output.startswith("Error: dataset") and "has no labels" in result.output


def test_cluster_with_n_pretrain_init_keeps_the_best_candidate(store):
    result = invoke("cluster", "--dataset", store["data"], "--n_clusters", "4", "--n_pretrain_init", "2",
                    "--pretrain_selection", "reconstruction", "--random_state", "5", "--registered_model_name", "none", *SMALL)
    assert result.exit_code == 0, result.output
    run = runs("cluster")[-1]
    client = MlflowClient()
    recon = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "candidate_reconstruction")}
    assert set(recon) == {5, 6}
    assert run.data.metrics["selected_seed"] == min(recon, key=recon.get)
    assert sorted(r.data.params["random_state"] for r in runs("pretrain") if r.data.tags.get("mlflow.parentRunId") == run.info.run_id) == ["5", "6"]
    assert f"Kept the autoencoder of seed {int(run.data.metrics['selected_seed'])}" in result.output
