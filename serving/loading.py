"""Load a logged DEC model without running any code stored with it.

``mlflow.pyfunc.load_model`` runs whatever the model's ``MLmodel`` names: the logged copy of
``onnx_pyfunc.py`` for a DEC model, or, if someone with write access to a shared artifact store
edits ``MLmodel``, a cloudpickled object or extra code paths. ``load_dec_model`` reads only data
from the artifact (``MLmodel`` with ``yaml.safe_load``, the model config, the ONNX graph) and runs
the ``DECOnnxModel`` class installed here; the result is a regular ``mlflow.pyfunc.PyFuncModel``
with the logged signature. ``evaluate`` and ``serving.server`` load models this way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import PyFuncModel, PythonModelContext

from serving.onnx_pyfunc import DECOnnxModel

CONFIG_KEYS = ("n_features", "n_clusters", "max_batch_rows", "device", "intra_op_threads")
INFERENCE_CONFIG_ENV = "MLFLOW_PYFUNC_INFERENCE_CONFIG"  # MLflow's own override variable, honoured the same way


class _Predictor:
    """The pyfunc interface over an installed ``DECOnnxModel`` (``PyFuncModel``'s ``model_impl``)."""

    def __init__(self, python_model: DECOnnxModel, context: PythonModelContext):
        self.python_model, self.context = python_model, context

    def predict(self, model_input, params=None):
        return self.python_model.predict(self.context, model_input, params=params)


def local_model_dir(model_uri: str) -> Path:
    """Download (or find) the model at ``model_uri``; raises ValueError naming it if that fails."""
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as e:
        message = e.message if isinstance(e, MlflowException) else str(e)
        raise ValueError(f"model {model_uri!r} could not be loaded: {message.splitlines()[0]}") from e


def load_dec_model(model_uri: str, model_config: dict | None = None) -> PyFuncModel:
    """A DEC model logged by ``serving.model_io.log_dec_model``, run by the code installed here.

    Parameters
    ----------
    model_uri : str
        ``models:/name@alias``, ``models:/name/version``, ``runs:/<id>/model``, ``models:/m-<id>`` or a
        local model directory.
    model_config : dict, optional
        Overrides of the logged model config (keys ``CONFIG_KEYS``), applied after those of the
        environment variable ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` (JSON), as MLflow does.

    Returns
    -------
    mlflow.pyfunc.PyFuncModel
        ``predict`` and ``metadata`` as from ``mlflow.pyfunc.load_model``; ``unwrap_python_model()``
        is the ``DECOnnxModel``.

    Raises
    ------
    ValueError
        If the URI cannot be resolved or the artifact is not a DEC ONNX model (no ``onnx`` artifact
        inside the model directory, missing config keys, unknown override keys).
    """
    local = local_model_dir(model_uri)
    meta = Model.load(str(local))  # yaml.safe_load: plain data
    flavor = meta.flavors.get("python_function", {})
    config = dict(flavor.get("config") or {})
    onnx_rel = (flavor.get("artifacts") or {}).get("onnx", {}).get("path")
    missing = [k for k in CONFIG_KEYS[:3] if k not in config]
    if not onnx_rel or missing:
        raise ValueError(f"model {model_uri!r} is not a DEC ONNX model (no onnx artifact or config {missing})")
    onnx_path = (local / onnx_rel).resolve()
    if not onnx_path.is_relative_to(local.resolve()) or not onnx_path.is_file():
        raise ValueError(f"model {model_uri!r}: its onnx artifact {onnx_rel!r} is not a file inside the model")
    overrides = json.loads(os.environ.get(INFERENCE_CONFIG_ENV) or "{}") | (model_config or {})
    unknown = sorted(set(overrides) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"model_config keys {unknown} are not known; choose from {', '.join(CONFIG_KEYS)}")
    context = PythonModelContext(artifacts={"onnx": str(onnx_path)}, model_config=config | overrides)
    python_model = DECOnnxModel()
    try:
        python_model.load_context(context)
    except (RuntimeError, ValueError) as e:  # device='cuda' without CUDA, a bad thread count
        raise ValueError(f"model {model_uri!r}: {e}") from e
    return PyFuncModel(model_meta=meta, model_impl=_Predictor(python_model, context), model_id=meta.model_id)

