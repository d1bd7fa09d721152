"""MLflow pyfunc model that serves a DEC network from its ONNX graph ("models from code").

MLflow copies this file into the logged model and executes it when the model is loaded, in the
serving environment. It therefore imports only mlflow, numpy, pandas and onnxruntime: no torch and
no dec_mlflow. ``serving.model_io.log_dec_model`` logs it together with the ONNX artifact written
by ``dec_mlflow.export``.

Model config (``model_config`` at log time; override at load time with
``mlflow.pyfunc.load_model(uri, model_config={...})`` or ``MLFLOW_PYFUNC_INFERENCE_CONFIG``):

- ``n_features`` : int, width of a request row.
- ``n_clusters`` : int, number of ``q_*`` output columns.
- ``max_batch_rows`` : int, largest number of rows accepted in one request.
- ``device`` : {'auto', 'cuda', 'cpu'}, see ``open_session``.
- ``intra_op_threads`` : int, onnxruntime threads per call; 0 (default) lets onnxruntime choose (one
  per core). With several server worker processes, cores // workers avoids oversubscription.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

try:
    import onnxruntime as ort
except ImportError as e:
    raise ImportError(
        "serving a DEC model needs onnxruntime: pip install onnxruntime-gpu (or onnxruntime; never both)"
    ) from e

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Tensor names written by dec_mlflow.export.
_INPUT, _Q, _LABELS, _EMBEDDING = "x", "q", "labels", "embedding"
# Rows per onnxruntime call: bounds the activations held at once (hidden layers are ~2000 wide).
_CHUNK_ROWS = 8192
# onnxruntime severities: 2 warning (its default), 3 error, 4 fatal. A failed CUDA provider load
# is logged at error level, so only 4 keeps a CPU-only machine quiet while probing.
_ORT_QUIET, _ORT_DEFAULT = 4, 2
# TF32 matmuls (Ampere and later) keep ~10 mantissa bits; the export's parity check (max |dq| <= 1e-4)
# and the served answers assume true float32, so the CUDA provider runs without them.
CUDA_OPTIONS = {"use_tf32": "0"}

_logger = logging.getLogger("serving.onnx_pyfunc")  # __name__ is random under models-from-code


def open_session(path: str, device: str = "auto", intra_op_threads: int = 0) -> "ort.InferenceSession":
    """Open the ONNX graph at ``path`` on CUDA when it really works there, else on the CPU.

    onnxruntime-gpu lists CUDAExecutionProvider whenever the build supports it, and falls back to
    the CPU (after logging errors) when the GPU or the CUDA/cuDNN libraries are missing. So CUDA is
    tried with onnxruntime's logging silenced, and ``session.get_providers()`` says what it got.

    Parameters
    ----------
    path : str
        ONNX file.
    device : {'auto', 'cuda', 'cpu'}
        'auto' takes CUDA when usable, else the CPU; 'cuda' raises when CUDA is not usable.
    intra_op_threads : int, default=0
        Threads of one call on the CPU; 0 lets onnxruntime choose.

    Returns
    -------
    onnxruntime.InferenceSession
        ``session.get_providers()[0]`` is the provider that runs the graph.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be an integer >= 0; got {intra_op_threads!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Idle worker threads spin by default; on a busy or shared host that steals the cores the next
    # request needs (bench/bench_serving.py measured ~2x at batch 1 and 64 under load without it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device != "cpu" and CUDA in ort.get_available_providers():
        ort.set_default_logger_severity(_ORT_QUIET)
        try:
            session = ort.InferenceSession(path, sess_options=options, providers=[(CUDA, CUDA_OPTIONS), CPU])
        finally:
            ort.set_default_logger_severity(_ORT_DEFAULT)
        if session.get_providers()[0] == CUDA or device == "auto":
            return session  # on a failed CUDA load this session already runs on the CPU
    if device == "cuda":
        raise RuntimeError(
            "device='cuda' but CUDAExecutionProvider is not usable here (no GPU, CUDA/cuDNN "
            "libraries missing, or a CPU-only onnxruntime); use device='auto' or 'cpu'"
        )
    return ort.InferenceSession(path, sess_options=options, providers=[CPU])


def check_batch(model_input, *, n_features: int, max_batch_rows: int) -> np.ndarray:
    """Validate a request batch and return it as float32 features.

    The logged signature has no input schema (see ``serving.model_io.feature_signature``), so this is
    the only check a batch gets: float32, float64 and integer arrays or DataFrames are accepted, and
    JSON nulls (which arrive as None in an object array) count as NaN. Messages are short and never
    repeat the data.

    Parameters
    ----------
    model_input : pandas.DataFrame or ndarray of shape (n_rows, n_features)
        Numeric features of any real or integer dtype.
    n_features : int
    max_batch_rows : int

    Returns
    -------
    ndarray of shape (n_rows, n_features), float32, C-contiguous

    Raises
    ------
    MlflowException
        With ``INVALID_PARAMETER_VALUE`` (HTTP 400) for a wrong type, an empty or oversized batch,
        a wrong number of features, a non-numeric column, or NaN / infinite values.
    """
    if not isinstance(model_input, (pd.DataFrame, np.ndarray)):
        _reject(f"expected a pandas DataFrame or numpy array; got {type(model_input).__name__}")
    if model_input.ndim != 2:
        _reject(f"expected a 2-D batch of shape (rows, {n_features}); got {model_input.ndim}-D")
    n_rows, width = model_input.shape
    if n_rows == 0:
        _reject("empty batch: send at least one row")
    if n_rows > max_batch_rows:
        _reject(f"batch has {n_rows} rows; at most {max_batch_rows} are accepted per request (max_batch_rows)")
    if width != n_features:
        _reject(f"expected {n_features} features per row; got {width}")
    if isinstance(model_input, pd.DataFrame):
        dtypes = model_input.dtypes
        for dtype in set(dtypes):  # a handful of distinct dtypes, not one check per column
            columns = dtypes.index[dtypes == dtype]
            if dtype != object:
                _check_numeric(None, dtype, f"column {columns[0]!r}")
            for column in columns if dtype == object else ():
                _check_numeric(model_input[column].to_numpy(), dtype, f"column {column!r}")
    else:
        _check_numeric(model_input if model_input.dtype == object else None, model_input.dtype, "array")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        x = np.ascontiguousarray(model_input, dtype=np.float32)  # (n_rows, n_features); None -> NaN
    n_bad = int((~np.isfinite(x)).sum())
    if n_bad:
        _reject(f"batch has {n_bad} NaN or infinite values (after casting to float32); all features must be finite")
    return x


def _check_numeric(objects: np.ndarray | None, dtype, where: str) -> None:
    """Reject a non-numeric dtype; an object array passes only if it holds numbers and None (JSON null)."""
    if objects is None:
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            _reject(f"{where} is not numeric (dtype {dtype}); all features must be numbers")
        return
    # numpy would turn the text "1.5" into 1.5 without a word: refuse text explicitly
    if any(not (v is None or isinstance(v, (int, float, np.number))) for v in objects.ravel()):
        _reject(f"{where} holds values that are not numbers (dtype object); all features must be numbers")


def _reject(message: str):
    raise MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def predictions_frame(q: np.ndarray, labels: np.ndarray, z: np.ndarray | None = None) -> pd.DataFrame:
    """Columns ``label`` (int64), ``q_0 .. q_{k-1}`` from q (n, k), then ``z_0 ..`` from z (n, e) if given."""
    frame = pd.DataFrame(q, columns=[f"q_{j}" for j in range(q.shape[1])])
    frame.insert(0, "label", labels.astype(np.int64))
    if z is not None:
        frame = pd.concat([frame, pd.DataFrame(z, columns=[f"z_{j}" for j in range(z.shape[1])])], axis=1)
    return frame


class DECOnnxModel(mlflow.pyfunc.PythonModel):
    """Raw features in; cluster label and soft assignments q out, computed by onnxruntime.

    Attributes (after ``load_context``)
    ----------------------------------
    session : onnxruntime.InferenceSession
    provider : str
        The execution provider running the graph, e.g. 'CPUExecutionProvider'.
    n_features, n_clusters, max_batch_rows : int
    """

    # MLflow inspects ``predict`` when a PythonModel subclass is defined (each time it loads this file) and warns
    # "Add type hints to the `predict` method to enable data validation ..." when ``model_input`` has none. It has
    # none on purpose (see ``predict``); this is MLflow's switch for classes that validate their input themselves
    # (its ChatModel and agents set it), and it keeps loading silent. A warning filter cannot: MLflow resets the
    # filters to "once" around that check.
    _skip_type_hint_validation = True

    def load_context(self, context):
        config = context.model_config
        self.n_features = int(config["n_features"])
        self.n_clusters = int(config["n_clusters"])
        self.max_batch_rows = int(config["max_batch_rows"])
        self.session = open_session(context.artifacts["onnx"], config.get("device", "auto"),
                                    int(config.get("intra_op_threads", 0)))
        self.provider = self.session.get_providers()[0]
        _logger.info("DEC ONNX model (%d features, %d clusters) runs on %s",
                     self.n_features, self.n_clusters, self.provider)

    # model_input is left unannotated so that the logged signature alone governs input checks
    # (MLflow also validates inputs against predict's type hints when there are any).
    def predict(self, context, model_input, params=None):
        """Features (n, n_features) -> DataFrame with ``label`` and ``q_0 .. q_{k-1}`` (n rows).

        With ``params={"include_embedding": True}`` the embedding follows as ``z_0 .. z_{e-1}``.
        """
        x = check_batch(model_input, n_features=self.n_features, max_batch_rows=self.max_batch_rows)
        return predictions_frame(*self.predict_arrays(x, bool((params or {}).get("include_embedding"))))

    def predict_arrays(self, x: np.ndarray, include_embedding: bool = False,
                       run_options: "ort.RunOptions | None" = None) -> list[np.ndarray]:
        """Checked float32 features (n, n_features) -> [q (n, k), labels (n,)] and the embedding (n, e) if asked.

        The arrays behind ``predict``'s DataFrame; ``serving.server`` encodes them to JSON directly.
        ``run_options``: setting its ``terminate`` from another thread stops the computation at the
        next graph node, with an onnxruntime error (``serving.server`` does so when a request times out).
        """
        outputs = [_Q, _LABELS, _EMBEDDING] if include_embedding else [_Q, _LABELS]
        chunks = [
            self.session.run(outputs, {_INPUT: x[start:start + _CHUNK_ROWS]}, run_options)
            for start in range(0, len(x), _CHUNK_ROWS)
        ]
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(outputs))]


mlflow.models.set_model(DECOnnxModel())
