"""Serving: the ONNX pyfunc, the registry, safe loading, a real `mlflow models serve` and `python -m serving.server`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import http.client
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from packaging.requirements import Requirement
import torch

from dec_mlflow.export import export_onnx
from dec_mlflow.model import Autoencoder, DECNet
from serving.loading import load_dec_model
from serving.model_io import log_dec_model, parity_sessions
from serving.onnx_pyfunc import DECOnnxModel, check_batch, open_session
from serving.server import ScoringApp, listening_socket, main as server_main

from conftest import BLOB_CLUSTERS as N_CLUSTERS, BLOB_FEATURES as N_FEATURES
from test_install import PLATFORMS, installed_ort_wheels

NAME = "dec-serving-test"
MAX_BATCH_ROWS = 100  # small, so an oversized request is cheap to send
ATOL_Q = 1e-5
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def X(blobs) -> np.ndarray:
    return blobs[0].astype(np.float64)  # float64, as user data usually is


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, experiment id) of a fresh sqlite store whose artifacts stay in a temp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        yield uri, experiment_id
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def logged(fitted, X, store):
    """(model_info, check, run_id) of the fitted network logged, registered and aliased champion."""
    with mlflow.start_run(experiment_id=store[1]) as run:
        info, check = log_dec_model(
            fitted.network_, X, registered_model_name=NAME, tags={"purpose": "test"},
            max_batch_rows=MAX_BATCH_ROWS,
        )
    MlflowClient().set_registered_model_alias(NAME, "champion", info.registered_model_version)
    return info, check, run.info.run_id


@pytest.fixture(scope="module")
def loaded(logged):
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def _q(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"q_{j}" for j in range(N_CLUSTERS)]].to_numpy()


# ------------------------------------------------------------------ logging and registry
def test_log_dec_model_logs_parity_metrics_and_pinned_requirements(logged):
    info, check, run_id = logged
    assert check["onnx_max_abs_dq"] <= ATOL_Q and check["onnx_labels_match"] == 1.0
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {k: metrics[k] for k in check} == pytest.approx(check)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text().splitlines()
    parsed = [Requirement(line) for line in requirements if line.strip()]
    assert sorted(r.name for r in parsed) == ["mlflow", "numpy", "onnxruntime", "onnxruntime-gpu", "pandas"]
    assert all(str(r.specifier).startswith("==") for r in parsed)
    # the logged file, markers included, picks exactly one onnxruntime wheel per platform
    for platform, (environment, expected) in PLATFORMS.items():
        assert installed_ort_wheels(requirements, environment) == [expected], platform
    config = mlflow.models.get_model_info(info.model_uri).flavors["python_function"]["config"]
    assert config == {"n_features": N_FEATURES, "n_clusters": N_CLUSTERS,
                      "max_batch_rows": MAX_BATCH_ROWS, "device": "auto", "intra_op_threads": 0}


def test_signature_has_an_output_schema_and_no_dtype_bound_input(logged, loaded, X):
    signature = mlflow.models.get_model_info(logged[0].model_uri).signature
    assert signature.inputs is None  # float32, float64 and ints all reach the model's own checks
    q_names = [f"q_{j}" for j in range(N_CLUSTERS)]
    outputs = {spec.name: (spec.type.name, spec.required) for spec in signature.outputs.inputs}
    assert list(outputs) == ["label", *q_names, "z_0", "z_1", "z_2", "z_3"]
    assert outputs["label"] == ("long", True) and outputs["q_0"] == ("float", True) and outputs["z_0"] == ("float", False)
    plain, with_z = loaded.predict(X[:3]), loaded.predict(X[:3], params={"include_embedding": True})
    assert list(plain.columns) == [n for n, (_, required) in outputs.items() if required]
    assert list(with_z.columns) == list(outputs)
    assert plain["label"].dtype == np.int64 and plain["q_0"].dtype == np.float32


def test_registered_version_is_ready_and_aliased(logged):
    info = logged[0]
    client = MlflowClient()
    version = client.get_model_version(NAME, info.registered_model_version)
    assert version.status == "READY" and version.source == info.model_uri
    assert client.get_model_version_by_alias(NAME, "champion").version == version.version


# ------------------------------------------------------------------ pyfunc round trip
@pytest.mark.parametrize(
    "to_input",
    [
        pytest.param(lambda X: pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]), id="dataframe"),
        pytest.param(lambda X: X, id="numpy-float64"),
        pytest.param(lambda X: X.astype(np.float32), id="numpy-float32"),
        pytest.param(lambda X: pd.DataFrame(X.astype(np.float32)), id="dataframe-float32"),
    ],
)
def test_pyfunc_predicts_like_the_estimator(loaded, fitted, X, to_input):
    batch = X[:MAX_BATCH_ROWS]
    out = loaded.predict(to_input(batch))
    assert list(out.columns) == ["label"] + [f"q_{j}" for j in range(N_CLUSTERS)]
    assert out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["label"].to_numpy(), fitted.predict(batch))
    np.testing.assert_allclose(_q(out), fitted.predict_proba(batch), rtol=0, atol=ATOL_Q)


def test_model_config_override_at_load_time(logged, fitted, X):
    model = mlflow.pyfunc.load_model(logged[0].model_uri, model_config={"max_batch_rows": 1000, "device": "cpu"})
    out = model.predict(X)  # 600 rows > the logged limit of 100
    np.testing.assert_array_equal(out["label"].to_numpy(), fitted.predict(X))


def test_loaded_model_exposes_and_logs_its_provider(logged, caplog):
    with caplog.at_level(logging.INFO, logger="serving.onnx_pyfunc"):
        model = mlflow.pyfunc.load_model(logged[0].model_uri)
    provider = model.unwrap_python_model().provider
    assert provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert f"20 features, 4 clusters) runs on {provider}" in caplog.text


def test_loading_a_model_prints_no_warning(logged, capfd):
    # MLflow warned "Add type hints to the `predict` method ..." at every load of the model file
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlflow.pyfunc.load_model(f"models:/{NAME}@champion")  # runs the onnx_pyfunc.py stored with the model
        load_dec_model(f"models:/{NAME}@champion")  # runs the installed serving.onnx_pyfunc
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert capfd.readouterr().err == ""


def _with(X, row, col, value):
    X = X[:5].copy()
    X[row, col] = value
    return X


def _with_text_column(X):
    frame = pd.DataFrame(X[:2])
    frame[3] = ["a", "b"]
    return frame


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda X: _with(X, 1, 3, np.nan), r"batch has 1 NaN or infinite values"),
        (lambda X: _with(_with(X, 0, 0, np.inf), 2, 2, np.nan), r"batch has 2 NaN or infinite values"),
        (lambda X: X[:5, :-1], r"^expected 20 features per row; got 19$"),
        (_with_text_column, r"^column 3 is not numeric \(dtype (str|object)\); all features must be numbers$"),
        (lambda X: X[:0], r"^empty batch: send at least one row$"),
        (lambda X: X[: MAX_BATCH_ROWS + 1],
         r"^batch has 101 rows; at most 100 are accepted per request \(max_batch_rows\)$"),
    ],
    ids=["nan", "inf", "too-narrow", "strings", "empty", "oversized"],
)
def test_pyfunc_refuses_bad_input(loaded, X, make_input, message):
    with pytest.raises(MlflowException, match=message) as info:
        loaded.predict(make_input(X))
    assert info.value.get_http_status_code() == 400


# ------------------------------------------------------------------ validation and providers
@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (np.ones((3, N_FEATURES + 1)), r"^expected 20 features per row; got 21$"),
        (pd.DataFrame({"a": [1.0], "b": ["x"]}).reindex(columns=["a", "b"] + [f"c{i}" for i in range(18)],
                                                          fill_value=0.0),
         r"^column 'b' is not numeric \(dtype .*\); all features must be numbers$"),
        (np.full((2, N_FEATURES), "1.5"), r"^array is not numeric \(dtype <U3\)"),
        ([[0.0] * N_FEATURES], r"^expected a pandas DataFrame or numpy array; got list$"),
        (np.ones(N_FEATURES), r"^expected a 2-D batch of shape \(rows, 20\); got 1-D$"),
        (np.full((1, N_FEATURES), 1e39), r"batch has 20 NaN or infinite values \(after casting to float32\)"),
    ],
    ids=["too-wide", "string-column", "string-array", "list", "1-d", "float32-overflow"],
)
def test_check_batch_messages_name_the_problem(model_input, message):
    with pytest.raises(MlflowException, match=message) as info:
        check_batch(model_input, n_features=N_FEATURES, max_batch_rows=MAX_BATCH_ROWS)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_check_batch_casts_float64_and_ints_to_float32():
    x = check_batch(np.arange(2 * N_FEATURES).reshape(2, N_FEATURES), n_features=N_FEATURES, max_batch_rows=2)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x[1, 0] == N_FEATURES


@pytest.fixture(scope="module")
def onnx_file(logged) -> str:
    return str(Path(mlflow.artifacts.download_artifacts(logged[0].model_uri)) / "artifacts" / "dec.onnx")


def test_open_session_on_cpu(onnx_file):
    assert open_session(onnx_file, "cpu").get_providers() == ["CPUExecutionProvider"]


def test_open_session_auto_is_quiet_and_reports_its_provider(onnx_file, capfd):
    session = open_session(onnx_file, "auto")
    assert session.get_providers()[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    if session.get_providers()[0] == "CPUExecutionProvider":
        assert "CUDA" not in capfd.readouterr().err  # the failed CUDA probe printed nothing


def test_open_session_cuda_raises_when_cuda_is_not_usable(onnx_file):
    if open_session(onnx_file, "auto").get_providers()[0] == "CUDAExecutionProvider":
        pytest.skip("CUDA is usable on this machine")
    with pytest.raises(RuntimeError, match=r"device='cuda' but CUDAExecutionProvider is not usable"):
        open_session(onnx_file, "cuda")


class _FakeCudaSession:
    """Stands in for onnxruntime.InferenceSession on a machine where CUDA is listed (as onnxruntime-gpu
    lists it) and either works (``works``) or silently falls back; it computes on the CPU, adding
    ``shift`` to q when it claims CUDA (a GPU path that computes something else)."""

    created: list = []
    works, shift = True, 0.0

    def __init__(self, path, sess_options=None, providers=()):
        self.requested = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.options = dict(p for p in providers if isinstance(p, tuple))
        self.on_cuda = self.requested[0] == "CUDAExecutionProvider" and self.works
        self._cpu = _REAL_SESSION(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self.runs = 0
        _FakeCudaSession.created.append(self)

    def get_providers(self):
        return self.requested if self.on_cuda else ["CPUExecutionProvider"]

    def get_inputs(self):
        return self._cpu.get_inputs()

    def run(self, outputs, feed):
        self.runs += 1
        result = self._cpu.run(outputs, feed)
        if self.on_cuda and outputs[0] == "q":
            result[0] = result[0] + np.float32(self.shift)
        return result


_REAL_SESSION = ort.InferenceSession


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    monkeypatch.setattr(_FakeCudaSession, "created", [])
    return _FakeCudaSession


@pytest.mark.parametrize("cuda_works", [True, False], ids=["cuda-usable", "cuda-falls-back"])
def test_parity_check_runs_on_the_provider_that_will_serve(fake_cuda, monkeypatch, fitted, X, tmp_path, cuda_works):
    monkeypatch.setattr(fake_cuda, "works", cuda_works)
    check = export_onnx(fitted.network_, tmp_path / "dec.onnx", X[:100], open_sessions=parity_sessions)
    assert check["onnx_checked_on_cuda"] == float(cuda_works)
    ran = [s.get_providers()[0] for s in fake_cuda.created if s.runs]
    assert ran == (["CPUExecutionProvider", "CUDAExecutionProvider"] if cuda_works else ["CPUExecutionProvider"])
    cuda_attempt = next(s for s in fake_cuda.created if s.requested[0] == "CUDAExecutionProvider")
    assert cuda_attempt.options == {"CUDAExecutionProvider": {"use_tf32": "0"}}  # full float32 on the GPU


def test_parity_check_refuses_a_graph_that_is_wrong_only_on_cuda(fake_cuda, monkeypatch, fitted, X, tmp_path):
    monkeypatch.setattr(fake_cuda, "shift", 1e-3)
    with pytest.raises(RuntimeError, match=r"^ONNX graph on CUDAExecutionProvider disagrees with PyTorch on 100 rows: "
                                           r"max \|dq\| = 0\.001 \(must be <= 0\.0001\)"):
        export_onnx(fitted.network_, tmp_path / "dec.onnx", X[:100], open_sessions=parity_sessions)
    assert list(tmp_path.iterdir()) == []


def test_open_session_takes_a_thread_count_and_refuses_a_bad_one(onnx_file):
    assert open_session(onnx_file, "cpu", 1).get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match=r"^intra_op_threads must be an integer >= 0; got -1$"):
        open_session(onnx_file, "cpu", -1)


def test_open_session_rejects_unknown_device(onnx_file):
    with pytest.raises(ValueError, match=r"device must be one of auto, cuda, cpu; got 'gpu'"):
        open_session(onnx_file, "gpu")


# ------------------------------------------------------------------ a real `mlflow models serve`
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, str]:
    """(status, body) of a GET (no body) or a POST of ``content_type``."""
    headers = {"Content-Type": content_type} if body is not None else {}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(logged, store, tmp_path_factory):
    """Base URL of `mlflow models serve` for the registered version; the server is always stopped."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0],
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn must be on PATH
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/{logged[0].registered_model_version}",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    with open(log, "wb") as out:
        # Own process group: the CLI starts uvicorn as a child, and both must be stopped.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _request(f"{url}/ping")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not answer /ping (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rows(X: np.ndarray) -> list[list[float]]:
    return X.tolist()


@pytest.mark.parametrize(
    "make_body",
    [
        pytest.param(lambda X: {"dataframe_split": {"columns": [f"x{i}" for i in range(N_FEATURES)], "data": _rows(X)}},
                     id="dataframe_split"),
        pytest.param(lambda X: {"inputs": _rows(X)}, id="inputs"),
    ],
)
def test_server_predicts_like_the_estimator(server, fitted, X, make_body):
    batch = X[:5]
    status, body = _request(f"{server}/invocations", json.dumps(make_body(batch)).encode())
    assert status == 200, body
    out = pd.DataFrame(json.loads(body)["predictions"])
    np.testing.assert_array_equal(out["label"].to_numpy(), fitted.predict(batch))
    np.testing.assert_allclose(_q(out), fitted.predict_proba(batch), rtol=0, atol=ATOL_Q)


def test_mlflow_models_predict_scores_a_batch_file(logged, store, fitted, X, tmp_path):
    pd.DataFrame(X[:50], columns=[f"x{i}" for i in range(N_FEATURES)]).to_csv(tmp_path / "batch.csv", index=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0], "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(VENV_BIN / "mlflow"), "models", "predict", "-m", f"models:/{NAME}/{logged[0].registered_model_version}",
         "--env-manager", "local", "-t", "csv", "-i", str(tmp_path / "batch.csv"), "-o", str(tmp_path / "out.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    np.testing.assert_array_equal(out["label"].to_numpy(), fitted.predict(X[:50]))


def _split(rows) -> bytes:
    return json.dumps({"dataframe_split": {"columns": [f"x{i}" for i in range(N_FEATURES)], "data": rows}}).encode()


@pytest.mark.parametrize(
    ("make_body", "message"),
    [
        (lambda X: _split([[None] + _rows(X)[0][1:]]), "batch has 1 NaN or infinite values"),
        (lambda X: _split([[float("inf")] + _rows(X)[0][1:]]), "batch has 1 NaN or infinite values"),
        (lambda X: json.dumps({"inputs": [[None] + _rows(X)[0][1:]]}).encode(), "batch has 1 NaN or infinite values"),
        (lambda X: json.dumps({"inputs": _rows(X[:2, :-1])}).encode(), "expected 20 features per row; got 19"),
        (lambda X: json.dumps({"inputs": [_rows(X)[0], _rows(X)[1][:-1]]}).encode(), "inhomogeneous"),
        (lambda X: _split([["abc"] + _rows(X)[0][1:]]), "column 'x0' is not numeric"),
        (lambda X: json.dumps({"inputs": [["abc"] + _rows(X)[0][1:]]}).encode(), "array is not numeric (dtype <U"),
        (lambda X: _split([]), "empty batch: send at least one row"),
        (lambda X: b'{"dataframe_split": {"data": [[1.0, 2.0', "Ensure that input is a valid JSON formatted string"),
        (lambda X: _split(_rows(X[: MAX_BATCH_ROWS + 1])), "batch has 101 rows; at most 100 are accepted per request"),
    ],
    ids=["nan", "inf", "inputs-null", "wrong-width", "ragged", "strings", "inputs-strings", "empty", "malformed-json",
         "oversized"],
)
def test_server_answers_bad_requests_with_a_short_400(server, X, make_body, message):
    status, body = _request(f"{server}/invocations", make_body(X))
    assert status == 400, body
    error = json.loads(body)
    assert message in error["message"]
    assert len(body) < 3000, f"{len(body)} characters"  # MLflow prefixes a truncated repr of the data


def test_server_scores_json_of_integers_and_csv(server, fitted, X):
    pixels = np.rint(X[:4] * 10).astype(np.int64)  # integer JSON numbers reach the model as int64
    status, body = _request(f"{server}/invocations", json.dumps({"inputs": pixels.tolist()}).encode())
    assert status == 200, body
    assert [p["label"] for p in json.loads(body)["predictions"]] == fitted.predict(pixels).tolist()
    csv = pd.DataFrame(X[:4], columns=[f"x{i}" for i in range(N_FEATURES)]).to_csv(index=False).encode()
    status, body = _request(f"{server}/invocations", csv, content_type="text/csv")
    assert status == 200, body
    assert [p["label"] for p in json.loads(body)["predictions"]] == fitted.predict(X[:4]).tolist()


def test_server_still_answers_after_bad_requests(server, fitted, X):
    assert _request(f"{server}/ping")[0] == 200
    status, body = _request(f"{server}/invocations", json.dumps({"inputs": _rows(X[:3])}).encode())
    assert status == 200
    assert [p["label"] for p in json.loads(body)["predictions"]] == fitted.predict(X[:3]).tolist()


# ------------------------------------------------------------------ loading without running the artifact's code
@pytest.fixture
def tampered_model(logged, tmp_path):
    """A copy of the logged model whose onnx_pyfunc.py creates a marker file when MLflow executes it."""
    model_dir = Path(mlflow.artifacts.download_artifacts(logged[0].model_uri, dst_path=str(tmp_path / "copy")))
    marker = tmp_path / "artifact-code-ran"
    code = model_dir / "onnx_pyfunc.py"
    code.write_text(code.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    return model_dir, marker


def test_mlflow_load_model_runs_the_code_stored_with_the_model(tampered_model):
    # the control: this is what a teammate runs when loading a model someone altered on a shared server
    model_dir, marker = tampered_model
    mlflow.pyfunc.load_model(str(model_dir))
    assert marker.exists()


def test_load_dec_model_runs_no_code_from_the_artifact(tampered_model, fitted, X):
    model_dir, marker = tampered_model
    model = load_dec_model(str(model_dir))
    out = model.predict(X[:10].astype(np.float32))
    np.testing.assert_array_equal(out["label"].to_numpy(), fitted.predict(X[:10]))
    assert not marker.exists()
    assert type(model.unwrap_python_model()).__module__ == "serving.onnx_pyfunc"  # the installed class


def test_load_dec_model_ignores_a_pickled_python_model_written_into_mlmodel(logged, tmp_path):
    model_dir = Path(mlflow.artifacts.download_artifacts(logged[0].model_uri, dst_path=str(tmp_path / "copy")))
    marker = tmp_path / "pickle-ran"
    (model_dir / "python_model.pkl").write_bytes(pickle.dumps(_RunsOnUnpickle(marker)))
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    flavor = meta["flavors"]["python_function"]
    flavor.pop("model_code_path")
    flavor["python_model"] = "python_model.pkl"  # what a cloudpickled pyfunc's MLmodel says
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))
    load_dec_model(str(model_dir)).predict(np.zeros((1, N_FEATURES)))
    assert not marker.exists()


class _RunsOnUnpickle:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize(
    ("uri", "message"),
    [("models:/no-such-model/1", r"^model 'models:/no-such-model/1' could not be loaded: "),
     ("/nonexistent/model", r"^model '/nonexistent/model' could not be loaded: ")],
)
def test_load_dec_model_names_a_model_that_cannot_be_found(store, uri, message):
    with pytest.raises(ValueError, match=message):
        load_dec_model(uri)


# ------------------------------------------------------------------ python -m serving.server
SMALL_BODY_LIMIT_MB = 0.05  # 52,428 bytes: ~150 rows of this data


@pytest.fixture(scope="module")
def dec_server(logged, store, tmp_path_factory):
    """Base URL of `python -m serving.server` (2 workers) for the registered version; always stopped."""
    port = _free_port()
    log = tmp_path_factory.mktemp("dec-server") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0], "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "serving.server", "-m", f"models:/{NAME}/{logged[0].registered_model_version}",
           "-p", str(port), "--workers", "2", "--max-body-mb", str(SMALL_BODY_LIMIT_MB)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield _wait_for_ping(proc, port, log)
    finally:
        _stop(proc)


def _wait_for_ping(proc, port, log) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if _request(f"{url}/ping")[0] == 200:
                return url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"server did not answer /ping (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(lambda X: json.dumps({"inputs": _rows(X)}).encode(), "application/json", id="inputs"),
        pytest.param(lambda X: json.dumps({"inputs": _rows(X), "params": {"include_embedding": True}}).encode(),
                     "application/json; charset=utf-8", id="inputs-embedding"),
        pytest.param(lambda X: _split(_rows(X)), "application/json", id="dataframe_split"),
        pytest.param(lambda X: json.dumps({"dataframe_records": pd.DataFrame(X).to_dict("records")}).encode(),
                     "application/json", id="dataframe_records"),
        pytest.param(lambda X: pd.DataFrame(X).to_csv(index=False).encode(), "text/csv", id="csv"),
    ],
)
def test_dec_server_answers_as_mlflow_models_serve(server, dec_server, X, body, content_type):
    request = body(X[:7])
    ours, theirs = (_request(f"{url}/invocations", request, content_type) for url in (dec_server, server))
    assert ours[0] == theirs[0] == 200, (ours, theirs)
    ours, theirs = pd.DataFrame(json.loads(ours[1])["predictions"]), pd.DataFrame(json.loads(theirs[1])["predictions"])
    assert list(ours.columns) == list(theirs.columns)
    np.testing.assert_array_equal(ours["label"], theirs["label"])
    np.testing.assert_allclose(ours.drop(columns="label"), theirs.drop(columns="label"), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"inputs": [[1.0, 2.0', 400, "request body is not valid JSON: "),
        (lambda X: json.dumps({"inputs": [[None] + _rows(X)[0][1:]]}).encode(), 400, "batch has 1 NaN or infinite values"),
        (lambda X: json.dumps({"inputs": _rows(X[:2, :-1])}).encode(), 400, "expected 20 features per row; got 19"),
        (lambda X: json.dumps({"inputs": [_rows(X)[0], _rows(X)[1][:-1]]}).encode(), 400,
         "inputs must be a list of equally long rows of numbers"),
        (lambda X: json.dumps({"inputs": _rows(X[:2]), "params": {"include_embedding": "yes"}}).encode(), 400,
         "params must be an object whose include_embedding is true or false"),
        (lambda X: json.dumps({"inputs": _rows(X[: MAX_BATCH_ROWS + 1])[:101]}).encode(), 400,
         "batch has 101 rows; at most 100 are accepted per request"),
        (lambda X: json.dumps({"rows": []}).encode(), 400, "The input must be a JSON dictionary with exactly one of"),
    ],
    ids=["malformed-json", "null", "wrong-width", "ragged", "bad-param", "too-many-rows", "no-format-key"],
)
def test_dec_server_answers_bad_requests_with_a_short_400(dec_server, X, body, status, message):
    answer = _request(f"{dec_server}/invocations", body if isinstance(body, bytes) else body(X))
    assert answer[0] == status, answer
    assert message in json.loads(answer[1])["message"]
    assert len(answer[1]) < 3000


def _raw_exchange(url: str, head: bytes, chunks=(), pause: float = 0.0) -> tuple[bytes, float]:
    """Send ``head`` then ``chunks`` on a raw socket, reading concurrently; (reply, seconds to the first reply byte)."""
    host, port = url.removeprefix("http://").split(":")
    reply, first = bytearray(), []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server answered and closed
            time.sleep(pause)
        sock.settimeout(10)
        try:
            while data := sock.recv(65536):
                first = first or [time.perf_counter() - start]
                reply.extend(data)
        except OSError:
            pass
    return bytes(reply), first[0] if first else float("inf")


def test_dec_server_refuses_a_declared_oversized_body_without_reading_it(dec_server):
    # 1 GB announced, nothing sent: a server that reads before refusing would wait here
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")
    reply, seconds = _raw_exchange(dec_server, head)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"connection: close" in reply.lower()
    assert b"request body of 1000000000 bytes; at most 52428 bytes are accepted (--max-body-mb 0.05)" in reply
    assert seconds < 1.0
    assert _request(f"{dec_server}/ping")[0] == 200


def test_dec_server_refuses_a_chunked_body_once_it_passes_the_limit(dec_server):
    head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (10_000, b"1" * 10_000)
    reply, _ = _raw_exchange(dec_server, head, [chunk] * 200, pause=0.005)  # 2 MB offered, 52 kB allowed
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b"request body passed 6" in reply  # refused at the first chunk beyond 52,428 bytes: 60,000
    assert _request(f"{dec_server}/ping")[0] == 200


def test_dec_server_accepts_a_body_just_under_the_limit(dec_server, fitted, X):
    rows = []
    while len(json.dumps({"inputs": rows + [_rows(X)[len(rows) % len(X)]]})) <= SMALL_BODY_LIMIT_MB * 2**20:
        rows.append(_rows(X)[len(rows) % len(X)])
    rows = rows[:MAX_BATCH_ROWS]
    status, body = _request(f"{dec_server}/invocations", json.dumps({"inputs": rows}).encode())
    assert status == 200, body[:300]
    assert [p["label"] for p in json.loads(body)["predictions"]] == fitted.predict(np.array(rows)).tolist()


def test_dec_server_cli_names_a_missing_model_in_one_line(store):
    result = CliRunner().invoke(server_main, ["-m", "models:/no-such-model/1"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: model 'models:/no-such-model/1' could not be loaded: ")
    assert len(result.output.strip().splitlines()) == 1


def test_the_listening_socket_turns_nagle_off_on_every_connection_it_accepts():
    # Linux copies TCP_NODELAY from the listening socket to each accepted one, whoever accepts it (uvicorn's workers,
    # any event loop); without it, 2 workers with h11 and asyncio waited 44 ms per request for the delayed ACK
    with listening_socket("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()):
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_dec_server_answers_small_requests_without_waiting_for_the_delayed_ack(dec_server, X):
    body = json.dumps({"inputs": _rows(X[:1])})
    connection = http.client.HTTPConnection(dec_server.removeprefix("http://"), timeout=30)
    seconds = []
    for _ in range(40):  # one keep-alive connection, as a client library holds it
        start = time.perf_counter()
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:300]
        response.read()
        seconds.append(time.perf_counter() - start)
    connection.close()
    assert np.median(seconds) < 0.02  # Nagle + delayed ACK: >= 0.04 s each


# ------------------------------------------------------------------ timeouts
def _asgi(app: ScoringApp, body: bytes) -> tuple[int, dict, dict, float]:
    """One POST /invocations through the ASGI app: (status, headers, JSON answer, seconds)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    start = time.monotonic()
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(sent[1]["body"]), time.monotonic() - start


class _SlowModel:
    """The loaded DEC model behind a call that blocks until released: a request whose work cannot be interrupted."""

    def __init__(self, model):
        self.model, self.release, self.run_options = model, threading.Event(), []
        self.n_features, self.max_batch_rows = model.n_features, model.max_batch_rows

    def predict_arrays(self, x, include_embedding=False, run_options=None):
        self.run_options.append(run_options)
        assert self.release.wait(timeout=60)
        return self.model.predict_arrays(x, include_embedding, run_options)


def test_a_timed_out_request_gets_504_and_new_work_503_until_its_worker_is_free(logged, fitted, X, caplog):
    app = ScoringApp(load_dec_model(f"models:/{NAME}@champion"), 2**20, timeout=0.3)
    slow = app.python_model = _SlowModel(app.python_model)
    body = json.dumps({"inputs": _rows(X[:5])}).encode()
    try:
        status, _, answer, seconds = _asgi(app, body)
        assert (status, answer["error_code"]) == (504, "DEADLINE_EXCEEDED") and seconds < 5
        assert slow.run_options[0].terminate  # its onnxruntime run is told to stop
        # the worker's thread is still busy: refused at once, not queued behind it
        status, headers, answer, seconds = _asgi(app, body)
        assert (status, answer["error_code"]) == (503, "TEMPORARILY_UNAVAILABLE") and seconds < 0.2
        assert "still stopping a request that exceeded the 0.3 s timeout" in answer["message"]
        assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        assert len(slow.run_options) == 1  # the refused request never reached the model
    finally:
        slow.release.set()
    deadline = time.monotonic() + 30
    while (answer := _asgi(app, body))[0] == 503:  # the runaway lets go of the worker, then requests are served
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert answer[0] == 200 and [p["label"] for p in answer[2]["predictions"]] == fitted.predict(X[:5]).tolist()
    assert "a request that timed out after 0.3 s released its worker" in caplog.text


def test_a_terminated_onnxruntime_run_stops_at_the_next_graph_node(tmp_path):
    # a deliberately slow graph: six 500-wide layers, ~0.3 s per 8192-row chunk on one thread here
    torch.manual_seed(0)
    network = DECNet(Autoencoder((20, 500, 500, 500, 500, 500, 500, 4)).encoder, torch.randn(4, 4),
                     torch.zeros(20), torch.ones(20)).eval()
    rows = np.random.default_rng(0).normal(size=(8192, 20)).astype(np.float32)
    export_onnx(network, tmp_path / "slow.onnx", rows[:50])
    model = DECOnnxModel()
    model.session = open_session(str(tmp_path / "slow.onnx"), "cpu", intra_op_threads=1)
    start = time.perf_counter()
    model.predict_arrays(rows)
    one_chunk = time.perf_counter() - start
    options = ort.RunOptions()
    stopper = threading.Timer(one_chunk / 2, lambda: setattr(options, "terminate", True))
    stopper.start()
    start = time.perf_counter()
    with pytest.raises(Exception, match="Exiting due to terminate flag being set to true"):
        model.predict_arrays(np.tile(rows, (12, 1)), run_options=options)  # 12 chunks uninterrupted
    assert time.perf_counter() - start < 3 * one_chunk
    stopper.join()
