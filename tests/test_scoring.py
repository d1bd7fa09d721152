"""Batch scoring (`score`): inputs, chunking, the local and Spark engines, and their agreement."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from sklearn.datasets import make_blobs

from dec_mlflow import scoring
from dec_mlflow.cli import main
from serving.model_io import log_dec_model

from conftest import BLOB_CLUSTERS, BLOB_FEATURES

REPO = Path(__file__).resolve().parents[1]
NAME = "dec-scoring-test"
N_ROWS = 3000
CHUNK = 700  # several chunks, the last one partial
MAX_BATCH_ROWS = 500  # below CHUNK: scoring must cap its chunks at the model's limit
ATOL_Q = 1e-6
Q_COLUMNS = [f"q_{j}" for j in range(BLOB_CLUSTERS)]


def _spark_missing() -> str | None:
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install 'dec-mlflow[spark]')"
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return "java (17 or newer) is not installed: no java on PATH and JAVA_HOME unset"
    return None


needs_spark = pytest.mark.skipif(_spark_missing() is not None, reason=str(_spark_missing()))


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    """(3000, 20) float64 from the blobs' centres, as raw features usually arrive."""
    return make_blobs(N_ROWS, n_features=BLOB_FEATURES, centers=BLOB_CLUSTERS, cluster_std=1.0, random_state=0)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary sqlite store with the fitted network registered as NAME version 1."""
    root = tmp_path_factory.mktemp("scoring")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    yield {"dir": root, "uri": uri}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def model_uri(store, fitted, X) -> str:
    experiment_id = mlflow.create_experiment("scoring", artifact_location=(store["dir"] / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id):
        log_dec_model(fitted.network_, X[:500], registered_model_name=NAME, max_batch_rows=MAX_BATCH_ROWS)
    return f"models:/{NAME}/1"


@pytest.fixture(scope="module")
def expected(model_uri, X) -> pd.DataFrame:
    """The pyfunc's own predictions on all rows, in chunks it accepts."""
    model = mlflow.pyfunc.load_model(model_uri)
    return pd.concat([model.predict(X[s:s + MAX_BATCH_ROWS]) for s in range(0, N_ROWS, MAX_BATCH_ROWS)], ignore_index=True)


@pytest.fixture(scope="module")
def inputs(store, X) -> dict[str, Path]:
    """The same rows as .npy, parquet without id (row groups of 400), parquet and CSV with string/int ids."""
    d = store["dir"] / "inputs"
    d.mkdir()
    features = {f"pixel {j}": X[:, j] for j in range(BLOB_FEATURES)}  # a space: names need quoting in Spark
    np.save(d / "x.npy", X)
    pq.write_table(pa.table(features), d / "plain.parquet", row_group_size=400)
    ids = [f"s{i:05d}" for i in range(N_ROWS)]
    pq.write_table(pa.table({"id": ids, **features}), d / "ids.parquet", row_group_size=1000)
    pd.DataFrame({"sample": np.arange(N_ROWS) * 7, **features}).to_csv(d / "ids.csv", index=False)
    return {"npy": d / "x.npy", "plain": d / "plain.parquet", "ids": d / "ids.parquet", "csv": d / "ids.csv"}


def _assert_matches(out: pd.DataFrame, expected: pd.DataFrame, key: str, keys) -> None:
    """``out`` (any row order) holds exactly one row per input row with the expected label and q."""
    assert list(out.columns) == [key, "label", *Q_COLUMNS]
    assert out["label"].dtype == np.int64 and all(out[c].dtype == np.float64 for c in Q_COLUMNS)
    order = pd.Series(np.arange(len(keys)), index=pd.Index(keys))
    out = out.iloc[np.argsort(order.loc[out[key]].to_numpy())].reset_index(drop=True)
    assert len(out) == N_ROWS and list(out[key]) == list(keys)
    np.testing.assert_array_equal(out["label"].to_numpy(), expected["label"].to_numpy())
    np.testing.assert_allclose(out[Q_COLUMNS].to_numpy(), expected[Q_COLUMNS].to_numpy(), rtol=0, atol=ATOL_Q)


# ------------------------------------------------------------------------------ inputs and chunks
@pytest.mark.parametrize("name", ["npy", "plain", "ids", "csv"])
def test_chunks_never_exceed_chunk_rows_and_cover_every_row_in_order(inputs, X, name):
    inp = scoring.open_input(inputs[name], id_column="sample" if name == "csv" else "id")
    chunks = list(scoring.iter_chunks(inp, CHUNK))
    assert max(len(x) for _, _, x in chunks) <= CHUNK
    assert [s for s, _, _ in chunks] == list(np.cumsum([0] + [len(x) for _, _, x in chunks[:-1]]))
    np.testing.assert_array_equal(np.concatenate([x for _, _, x in chunks]), X)
    assert inp.n_features == BLOB_FEATURES and inp.key == {"ids": "id", "csv": "sample"}.get(name, "row")


def test_open_input_recognises_the_id_column_only_by_name(inputs):
    assert scoring.open_input(inputs["ids"]).has_id
    assert not scoring.open_input(inputs["csv"]).has_id  # its id column is 'sample', not 'id'
    assert scoring.open_input(inputs["csv"]).n_features == BLOB_FEATURES + 1


def test_local_engine_memory_is_bounded_by_the_chunk_not_the_input(model_uri, tmp_path):
    x = np.random.default_rng(0).normal(size=(60_000, BLOB_FEATURES))  # 9.6 MB as float64
    np.save(tmp_path / "big.npy", x)
    del x
    job = scoring.plan(model_uri, tmp_path / "big.npy", tmp_path / "out.parquet", chunk_rows=400)
    tracemalloc.start()
    try:
        scoring.execute(job)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 9.6e6 / 4, f"peak {peak / 1e6:.1f} MB of numpy/Python memory for a 9.6 MB input"
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == 60_000


# ------------------------------------------------------------------------------ local engine
@pytest.mark.parametrize("name, id_column, key", [("npy", "id", "row"), ("plain", "id", "row"), ("ids", "id", "id"), ("csv", "sample", "sample")])
def test_local_engine_writes_one_row_per_input_row_in_order(model_uri, expected, inputs, tmp_path, name, id_column, key):
    result = scoring.score_file(model_uri, inputs[name], tmp_path / "out.parquet", id_column=id_column, chunk_rows=CHUNK)
    out = pd.read_parquet(tmp_path / "out.parquet")
    keys = {"row": np.arange(N_ROWS), "id": [f"s{i:05d}" for i in range(N_ROWS)], "sample": np.arange(N_ROWS) * 7}[key]
    assert list(out[key]) == list(keys)  # the local engine keeps input order
    _assert_matches(out, expected, key, keys)
    assert result.n_rows == N_ROWS and result.engine == "local" and result.spark_master is None
    assert result.cluster_sizes == np.bincount(expected["label"], minlength=BLOB_CLUSTERS).tolist()
    assert os.listdir(tmp_path) == ["out.parquet"]  # nothing partial left beside it


def test_chunk_rows_is_capped_at_the_models_max_batch_rows(model_uri, inputs, tmp_path):
    job = scoring.plan(model_uri, inputs["npy"], tmp_path / "out.parquet", chunk_rows=100_000)
    assert job.chunk_rows == MAX_BATCH_ROWS
    assert scoring.execute(job).n_rows == N_ROWS


@pytest.mark.parametrize("make_input, kwargs, message", [
    (lambda d, X: d / "missing.npy", {}, r"missing.npy': no such file"),
    (lambda d, X: _write(d / "x.txt", "1,2\n"), {}, r"format '.txt' is not supported; give a .parquet, .csv, .npy file"),
    (lambda d, X: _save(d / "narrow.npy", X[:, :5]), {}, r"has 5 feature columns; model 'models:/dec-scoring-test/1' expects 20"),
    (lambda d, X: _save(d / "flat.npy", X[:, 0]), {}, r"expected a 2-D numeric array; got shape \(3000,\)"),
    (lambda d, X: _write(d / "text.csv", "id,a\n1,x\n"), {}, r"column 'a' is not numeric; every column but the id column 'id'"),
    (lambda d, X: d / "x.npy", {"engine": "dask"}, r"engine must be one of local, spark; got 'dask'"),
    (lambda d, X: d / "x.npy", {"chunk_rows": 0}, r"chunk_rows must be an integer >= 1; got 0"),
    (lambda d, X: d / "x.npy", {"id_column": "q_3"}, r"id_column 'q_3' would collide with an output column"),
])
def test_bad_parameters_are_refused_before_any_work(model_uri, inputs, X, tmp_path, make_input, kwargs, message):
    shutil.copy(inputs["npy"], tmp_path / "x.npy")
    path = make_input(tmp_path, X)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message):
        scoring.plan(model_uri, path, tmp_path / "out.parquet", **kwargs)
    assert set(os.listdir(tmp_path)) == before


def test_existing_output_and_unknown_model_are_refused(model_uri, inputs, tmp_path):
    (tmp_path / "out.parquet").write_text("keep me")
    with pytest.raises(ValueError, match=r"out.parquet' already exists; remove it or choose another path"):
        scoring.plan(model_uri, inputs["npy"], tmp_path / "out.parquet")
    assert (tmp_path / "out.parquet").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"model 'models:/nope/1' could not be loaded: "):
        scoring.plan("models:/nope/1", inputs["npy"], tmp_path / "new.parquet")


def test_a_refused_row_names_its_chunk_and_leaves_no_output(model_uri, X, tmp_path):
    bad = X.copy()
    bad[1234, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad.npy', rows 1000..1499: batch has 1 NaN or infinite values"):
        scoring.score_file(model_uri, tmp_path / "bad.npy", tmp_path / "out.parquet", chunk_rows=CHUNK)
    assert os.listdir(tmp_path) == ["bad.npy"]


def test_score_command_logs_a_run_with_counts(model_uri, inputs, tmp_path, expected):
    result = CliRunner().invoke(main, ["score", "--model", model_uri, "--input", str(inputs["ids"]),
                                       "--output", str(tmp_path / "out.parquet"), "--chunk_size", "1000"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"Scored {N_ROWS} rows" in result.output and "engine local" in result.output
    experiment = mlflow.get_experiment_by_name("Default")
    run = MlflowClient().search_runs([experiment.experiment_id], "tags.`dec.stage` = 'score'")[0]
    assert run.info.status == "FINISHED" and run.data.params["engine"] == "local" and run.data.tags["model_uri"] == model_uri
    assert run.data.metrics["n_rows"] == N_ROWS and run.data.metrics["rows_per_s"] > 0
    sizes = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/cluster_sizes.json")["cluster_sizes"]
    assert sizes == np.bincount(expected["label"], minlength=BLOB_CLUSTERS).tolist()
    result = CliRunner().invoke(main, ["score", "--model", model_uri, "--input", str(inputs["ids"]), "--output", str(tmp_path / "out.parquet")])
    assert result.exit_code == 1 and "already exists" in result.output


# ------------------------------------------------------------------------------ spark engine
@pytest.fixture(scope="module")
def spark():
    """One local[2] session for the in-process Spark tests; scoring uses the active session."""
    session, created = scoring.spark_session("local[2]", CHUNK)
    yield session
    if created:
        session.stop()


@needs_spark
@pytest.mark.parametrize("name, id_column, key", [("plain", "id", "row"), ("ids", "id", "id"), ("csv", "sample", "sample")])
def test_spark_engine_agrees_with_the_local_engine(spark, model_uri, expected, inputs, tmp_path, name, id_column, key):
    result = scoring.score_file(model_uri, inputs[name], tmp_path / "spark.parquet", engine="spark", id_column=id_column, chunk_rows=CHUNK)
    assert result.engine == "spark" and result.spark_master == "local[2]" and result.n_rows == N_ROWS
    assert (tmp_path / "spark.parquet").is_dir() and (tmp_path / "spark.parquet" / "_SUCCESS").exists()
    keys = {"row": np.arange(N_ROWS), "id": [f"s{i:05d}" for i in range(N_ROWS)], "sample": np.arange(N_ROWS) * 7}[key]
    _assert_matches(pd.read_parquet(tmp_path / "spark.parquet"), expected, key, keys)
    scoring.score_file(model_uri, inputs[name], tmp_path / "local.parquet", id_column=id_column, chunk_rows=CHUNK)
    local = pd.read_parquet(tmp_path / "local.parquet")
    assert pd.read_parquet(tmp_path / "spark.parquet").dtypes.equals(local.dtypes)
    assert sorted(os.listdir(tmp_path)) == ["local.parquet", "spark.parquet"]  # staging and partial output removed


@needs_spark
def test_spark_engine_reports_a_refused_row_and_leaves_no_output(spark, model_uri, X, tmp_path):
    bad = pd.DataFrame(X, columns=[f"x{j}" for j in range(BLOB_FEATURES)])
    bad.loc[17, "x2"] = np.nan
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), tmp_path / "bad.parquet")  # NaN stored as null
    with pytest.raises(ValueError, match=r"bad.parquet': batch has 1 NaN or infinite values"):
        scoring.score_file(model_uri, tmp_path / "bad.parquet", tmp_path / "out.parquet", engine="spark", chunk_rows=CHUNK)
    assert os.listdir(tmp_path) == ["bad.parquet"]


@needs_spark
def test_score_entry_point_on_spark_through_mlflow_run(store, model_uri, expected, inputs, tmp_path):
    """`mlflow run . -e score -P engine=spark` in a new process: its own Spark session on the given master."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "score", "--env-manager", "local",
            "-P", f"model={model_uri}", "-P", f"input={inputs['npy']}", "-P", f"output={tmp_path / 'out.parquet'}",
            "-P", "engine=spark", "-P", "spark_master=local[2]", "-P", f"chunk_size={CHUNK}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Scored {N_ROWS} rows" in proc.stdout and "engine spark, local[2]" in proc.stdout
    _assert_matches(pd.read_parquet(tmp_path / "out.parquet"), expected, "row", np.arange(N_ROWS))
    experiment = mlflow.get_experiment_by_name("Default")
    run = MlflowClient().search_runs([experiment.experiment_id], "params.engine = 'spark'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["spark_master"] == "local[2]"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path
