"""Log a fitted DEC network to MLflow as an ONNX-backed pyfunc model.

Reads a ``DECNet`` and a sample of raw features; writes, in the active MLflow run, a logged model
holding ``serving/onnx_pyfunc.py`` and the verified ONNX graph, plus the parity figures as metrics.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from dec_mlflow.export import export_onnx
from dec_mlflow.model import DECNet
from serving import onnx_pyfunc
from serving.onnx_pyfunc import CUDA, open_session

PYFUNC_PATH = Path(__file__).with_name("onnx_pyfunc.py")
DEFAULT_MAX_BATCH_ROWS = 100_000
_EXAMPLE_ROWS = 3
# PEP 508 environment markers (the same in pyproject.toml and conda.yaml): where onnxruntime-gpu has
# wheels (Linux and Windows on x86_64; Windows reports AMD64), and the exact complement (markers
# have no `not`).
GPU_WHEEL_MARKER = '(sys_platform == "linux" or sys_platform == "win32") and (platform_machine == "x86_64" or platform_machine == "AMD64")'
CPU_WHEEL_MARKER = '(sys_platform != "linux" and sys_platform != "win32") or (platform_machine != "x86_64" and platform_machine != "AMD64")'


def log_dec_model(
    network: DECNet,
    X_sample: np.ndarray,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    tags: dict[str, str] | None = None,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
):
    """Export ``network`` to ONNX, verify it on ``X_sample`` and log it as a pyfunc model.

    Logs into the active run (MLflow starts one if none is active).

    Parameters
    ----------
    network : DECNet
        The fitted network (``DEC.network_``).
    X_sample : ndarray of shape (n_samples, n_features)
        Raw features for the ONNX parity check (a few thousand rows suffice); its first rows
        become the input example.
    name : str, default='model'
        Name of the logged model.
    registered_model_name : str, optional
        Also register the model under this name (creates a new version).
    tags : dict, optional
        Tags of the logged model.
    max_batch_rows : int, default=100_000
        Largest request the served model accepts; stored in the model config.

    Returns
    -------
    model_info : mlflow.models.model.ModelInfo
    check : dict
        ``onnx_max_abs_dq``, ``onnx_labels_match``, ``onnx_check_rows``, ``onnx_near_ties`` and
        ``onnx_checked_on_cuda`` (also logged as metrics; see ``dec_mlflow.export.verify_onnx``).

    Raises
    ------
    ValueError
        If ``max_batch_rows`` < 1 or ``X_sample`` does not fit the network.
    RuntimeError
        If onnxruntime disagrees with PyTorch (see ``dec_mlflow.export.export_onnx``).
    """
    if isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int) or max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be an integer >= 1; got {max_batch_rows!r}")
    X_sample = np.asarray(X_sample, dtype=np.float64)
    n_features, n_clusters = network.offset.shape[0], network.centroids.shape[0]
    config = {"n_features": n_features, "n_clusters": n_clusters, "max_batch_rows": max_batch_rows, "device": "auto",
              "intra_op_threads": 0}
    with tempfile.TemporaryDirectory() as tmp, _config_params_of_a_run_with_auto_k(config):
        onnx_path = Path(tmp) / "dec.onnx"
        check = export_onnx(network, onnx_path, X_sample, open_sessions=parity_sessions)
        model_info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_PATH),
            artifacts={"onnx": str(onnx_path)},
            model_config=config,
            signature=feature_signature(n_clusters, network.centroids.shape[1]),
            input_example=X_sample[:_EXAMPLE_ROWS],
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name,
            tags=tags,
        )
    mlflow.log_metrics(check, model_id=model_info.model_id)
    return model_info, check


class _DropConfigParamsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to log model config as params")


@contextmanager
def _config_params_of_a_run_with_auto_k(config: dict):
    """MLflow logs a model's config as params of the active run, all in one batch. A run of
    ``n_clusters=auto`` already holds n_clusters='auto', so that batch fails with a warning and logs
    nothing: log the other keys here instead, and keep the warning (about the expected clash) quiet."""
    run = mlflow.active_run()
    held = mlflow.get_run(run.info.run_id).data.params.get("n_clusters") if run else None
    if held is None or held == str(config["n_clusters"]):
        yield
        return
    mlflow.log_params({k: v for k, v in config.items() if k != "n_clusters"})
    logger, quiet = logging.getLogger("mlflow.models.model"), _DropConfigParamsWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def parity_sessions(path: str) -> list:
    """The onnxruntime sessions the export check runs on: those a served model can run on.

    The CPU always (every served model falls back to it), and also CUDA when ``device='auto'``
    picks it here (``open_session`` decides exactly as at serving time), so a model trained on a
    GPU machine is verified on the provider that will serve it.
    """
    sessions = [open_session(path, "cpu")]
    if CUDA in onnx_pyfunc.ort.get_available_providers():
        auto = open_session(path, "auto")
        if auto.get_providers()[0] == CUDA:
            sessions.append(auto)
    return sessions


def feature_signature(n_clusters: int, embedding_dim: int) -> ModelSignature:
    """Outputs ``label``, ``q_0..`` (and, on request, ``z_0..``); the ``include_embedding`` parameter; no input schema.

    No input schema, on purpose: MLflow enforces a tensor input's dtype exactly, so a float64
    tensor refuses float32 arrays (the natural dtype of features) and a float32 one refuses
    float64 (what pandas and JSON numbers give), while a column schema costs ~150 ms per request at
    784 features. Without it, MLflow passes arrays and DataFrames of any dtype to the model, and
    JSON ``inputs`` go straight into one numpy array; ``onnx_pyfunc.check_batch`` then checks
    everything the schema did (2-D, width, numeric, finite, batch size) with short messages and
    casts to float32 once. The input contract is in the model config (``n_features``) and the
    logged input example.
    """
    outputs = [ColSpec(DataType.long, "label")]
    outputs += [ColSpec(DataType.float, f"q_{j}") for j in range(n_clusters)]
    outputs += [ColSpec(DataType.float, f"z_{j}", required=False) for j in range(embedding_dim)]
    return ModelSignature(
        inputs=None,
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("include_embedding", DataType.boolean, False)]),
    )


def pinned_requirements() -> list[str]:
    """The served model's pip requirements, pinned at the versions running here.

    onnxruntime-gpu (which also runs on CPU-only machines) where its wheels exist, Linux and Windows
    on x86_64, and the plain onnxruntime wheel everywhere else (macOS, aarch64), chosen by
    environment markers so that exactly one of the two is installed: both use the import name
    ``onnxruntime`` and break each other. Both are pinned at the version of whichever one is
    installed here (the two are released together with the same version numbers).
    """
    ort_version = importlib.import_module("onnxruntime").__version__
    pins = [f"{dist}=={importlib.metadata.version(dist)}" for dist in ("mlflow", "numpy", "pandas")]
    return pins + [f"onnxruntime-gpu=={ort_version}; {GPU_WHEEL_MARKER}", f"onnxruntime=={ort_version}; {CPU_WHEEL_MARKER}"]
