"""Default parameters on every kind of data a user brings: no NaN, no traceback (issue: quality on any data);
degenerate data refused before training, and a degenerate embedding never takes down a finished training.

Each data kind pretrains the default network (d-500-500-2000-10, SGD at pretrain_lr=1.0) for about
100 iterations under the default scaling: where the previous defaults diverged within 10 to 80
iterations. Divergence recovery is tested by forcing rates that diverge.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from sklearn import datasets as skdata
from sklearn.feature_extraction.text import TfidfVectorizer

from dec_mlflow import DEC, tracking
from dec_mlflow.callbacks import Callback
from dec_mlflow.data import load_dataset
from dec_mlflow.estimator import PretrainedAutoencoder
from dec_mlflow.model import Autoencoder

ROWS = 512  # two batches of 256 per epoch; 50 epochs make 100 iterations


class Retries(Callback):
    def __init__(self):
        self.messages = []

    def on_retry(self, stage, attempt, message):
        self.messages.append((stage, attempt, message))


def _images(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    # strokes on a dark background, like digits: a few bright blobs per 28x28 image
    img = np.zeros((ROWS, 28, 28), np.float32)
    for i in range(ROWS):
        r, c = rng.integers(4, 20, 2)
        img[i, r : r + 6, c : c + 4] = rng.uniform(0.5, 1.0)
    return img.reshape(ROWS, -1) if kind == "unit" else np.round(img.reshape(ROWS, -1) * 255).astype(np.uint8)


def _tfidf() -> np.ndarray:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(300)])
    docs = [" ".join(rng.choice(words, size=40, p=np.r_[np.full(30, 0.02), np.full(270, 0.4 / 270)])) for _ in range(ROWS)]
    return TfidfVectorizer().fit_transform(docs).toarray().astype(np.float32)


def _mixed_table() -> np.ndarray:
    x, _ = skdata.make_blobs(ROWS, n_features=12, centers=4, random_state=0)
    scales = 10.0 ** np.linspace(-3, 4, 12)
    x = x * scales + np.linspace(-1e3, 1e3, 12)
    x[:, 0] = np.exp(x[:, 0] / scales[0] / 2)  # a heavy-tailed positive column
    return x.astype(np.float32)


DATA_KINDS = {
    "images_unit_npy": lambda: _images("unit"),
    "images_uint8_npz": lambda: _images("byte"),
    "images_csv": lambda: _images("byte"),
    "images_parquet": lambda: _images("unit"),
    "mixed_scale_table": _mixed_table,
    "tfidf_rows": _tfidf,
    "sklearn_digits": lambda: skdata.load_digits().data,
    "sklearn_wine": lambda: skdata.load_wine().data,
    "sklearn_breast_cancer": lambda: skdata.load_breast_cancer().data,
    "blobs_high_dim": lambda: skdata.make_blobs(ROWS, n_features=200, centers=5, cluster_std=4.0, random_state=0)[0],
}


def _as_file(name: str, x: np.ndarray, tmp_path) -> str:
    """Write ``x`` the way a user would hand it over, and load it back through the data layer."""
    if name.endswith("_npz"):
        path = tmp_path / f"{name}.npz"
        np.savez(path, x=x)
    elif name.endswith("_csv"):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame(x).to_csv(path, index=False)
    elif name.endswith("_parquet"):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(x, columns=[f"p{i}" for i in range(x.shape[1])]).to_parquet(path)
    else:
        path = tmp_path / f"{name}.npy"
        np.save(path, x)
    return str(path)


@pytest.mark.parametrize("name", list(DATA_KINDS))
def test_default_pretraining_stays_finite_without_restarts(name, tmp_path):
    data = load_dataset(_as_file(name, np.asarray(DATA_KINDS[name]()), tmp_path))
    iters_per_epoch = -(-len(data.x) // 256)
    est = DEC(n_clusters=3, pretrain_epochs=max(1, 100 // iters_per_epoch), scaling=data.default_scaling, precision="fp32")
    retries = Retries()
    ae = est.pretrain(data.x, retries)
    assert np.isfinite(ae.loss)
    assert retries.messages == []  # the default scaling and rate needed no restart
    assert ae.lr == 1.0


def test_mnist_written_to_a_file_trains_under_defaults(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("DEC_DATA_DIR", str(mnist_dir.parent))
    mnist = load_dataset("mnist")
    path = tmp_path / "mnist_sample.npz"
    np.savez(path, x=mnist.x[:ROWS].astype(np.float32) / 255.0, y=mnist.y[:ROWS])
    data = load_dataset(str(path))
    ae = DEC(n_clusters=10, pretrain_epochs=50, scaling=data.default_scaling, precision="fp32").pretrain(data.x)
    assert np.isfinite(ae.loss) and ae.lr == 1.0


def _blobs():
    x, _ = skdata.make_blobs(600, n_features=20, centers=4, cluster_std=1.0, random_state=0)
    return x.astype(np.float32)


def test_a_diverging_rate_restarts_at_a_quarter_and_reports_it():
    from conftest import SMALL

    retries = Retries()
    ae = DEC(**{**SMALL, "pretrain_lr": 8.0}).pretrain(_blobs(), retries)  # nan at epoch 2 at rate 8
    assert [(stage, attempt) for stage, attempt, _ in retries.messages] == [("pretrain", 1)]
    assert "reconstruction loss became nan" in retries.messages[0][2] and "restarting at pretrain_lr=2" in retries.messages[0][2]
    assert ae.lr == 2.0 and np.isfinite(ae.loss)


def test_a_finite_blow_up_counts_as_divergence():
    from conftest import SMALL

    retries = Retries()
    ae = DEC(**{**SMALL, "pretrain_lr": 16.0}).pretrain(_blobs(), retries)  # huge but finite loss at rate 16
    assert "times that of reconstructing zeros" in retries.messages[0][2]
    assert ae.lr == 1.0 and ae.loss < 0.01


def test_divergence_at_every_rate_is_one_error_naming_pretrain_lr():
    from conftest import SMALL

    with pytest.raises(FloatingPointError, match=r"pretraining diverged at pretrain_lr=1e\+30 and at each of 3 restarts "
                                                 r"down to 1.5625e\+28; lower pretrain_lr"):
        DEC(**{**SMALL, "pretrain_lr": 1e30}).pretrain(_blobs())


# ---------------------------------------------------------------- degenerate data through `cluster`
@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A folder with a sqlite store, and the environment of a `dec-mlflow` command that uses it."""
    root = tmp_path_factory.mktemp("degenerate")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    return {"dir": root, "env": env, "uri": env["MLFLOW_TRACKING_URI"]}


def _cluster_cli(store, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dec_mlflow.cli", "cluster", "--experiment", "degenerate", *args]
    return subprocess.run(command, cwd=store["dir"], env=store["env"], capture_output=True, text=True, timeout=900)


def _runs(store) -> list:
    client = MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name("degenerate")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.mark.parametrize("make, options, error", [
    # 400 identical rows trained, then t-SNE crashed the process (segmentation fault) and left the run RUNNING
    (lambda: np.ones((400, 12), np.float32), ("--n_clusters", "3", "--pretrain_epochs", "2"),
     "X has no spread: all 400 rows are identical (every feature is constant); there is nothing to cluster"),
    # 2,500 epochs of pretraining ran before the initialisation refused it
    (lambda: skdata.make_blobs(400, n_features=12, centers=3, random_state=0)[0].astype(np.float32), ("--n_clusters", "400"),
     "init='manifold' needs more samples than clusters; got n_samples=400, n_clusters=400 (use fewer clusters, or init='kmeans')"),
], ids=["identical-rows", "n_clusters-equal-to-rows"])
def test_data_cluster_cannot_train_on_is_refused_in_one_line_before_any_run(cli_store, make, options, error):
    path = cli_store["dir"] / "data.npy"
    np.save(path, make())
    before = len(_runs(cli_store))
    proc = _cluster_cli(cli_store, "--dataset", str(path), *options)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"Error: dataset '{path}': {error}"]
    assert len(_runs(cli_store)) == before  # refused before a run started, so none is left RUNNING


def test_a_collapsed_embedding_ends_in_a_finished_run_with_its_figures_simplified_and_a_warning(cli_store):
    """An encoder whose every output is the same point: self-training, figures, export and evaluation all go through."""
    x, y = skdata.make_blobs(300, n_features=12, centers=3, random_state=0)
    data = cli_store["dir"] / "blobs.npz"
    np.savez(data, x=x.astype(np.float32), y=y)
    autoencoder = Autoencoder((12, 16, 8, 3))
    with torch.no_grad():
        for weight in autoencoder.encoder.parameters():
            weight.zero_()  # z = 0 for every row
    PretrainedAutoencoder(autoencoder, np.zeros(12, np.float32), np.ones(12, np.float32), 1.0, 0.1).save(
        cli_store["dir"] / "collapsed.pt")
    proc = _cluster_cli(cli_store, "--dataset", str(data), "--autoencoder", str(cli_store["dir"] / "collapsed.pt"),
                        "--n_clusters", "3", "--hidden_dims", "16,8,3", "--init", "kmeans", "--figure_sample_size", "50",
                        "--registered_model_name", "dec-collapsed", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = "all 50 points share one embedding (no spread); t-SNE skipped"
    assert f"Warning: self_training_tsne.png: {note}" in proc.stderr
    assert "labels identical but for 300 near-ties not compared" in proc.stdout  # every q is 1/3: all rows tie
    run = next(r for r in _runs(cli_store) if r.data.tags.get(tracking.STAGE_TAG) == "cluster")
    assert run.info.status == "FINISHED"
    assert run.data.tags[f"{tracking.FIGURE_WARNING_TAG}.self_training_tsne.png"] == note
    client = MlflowClient(cli_store["uri"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"self_training_tsne.png", "self_training_curves.png",
                                                                         "gradient_vs_q.png", "network"}
    assert run.data.metrics["onnx_near_ties"] == 300
    evaluate = subprocess.run([sys.executable, "-m", "dec_mlflow.cli", "evaluate", "--model", "models:/dec-collapsed/1",
                               "--dataset", str(data), "--sample_size", "50", "--experiment", "degenerate"],
                              cwd=cli_store["dir"], env=cli_store["env"], capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    run = next(r for r in _runs(cli_store) if r.data.tags.get(tracking.STAGE_TAG) == "evaluate")
    assert run.info.status == "FINISHED" and run.data.tags[f"{tracking.FIGURE_WARNING_TAG}.embedding_tsne.png"] == note
