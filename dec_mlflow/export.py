"""ONNX export of a fitted DEC network, verified against PyTorch before it is kept.

Reads a ``DECNet`` and a sample of raw features; writes one self-contained ``.onnx`` file with
input ``x`` (batch, n_features) float32 and outputs ``q`` (batch, n_clusters) float32,
``labels`` (batch,) int64 and ``embedding`` (batch, embedding_dim) float32.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from dec_mlflow.model import DECNet

INPUT_NAME = "x"
OUTPUT_NAMES = ("q", "labels", "embedding")
# Largest |q_onnx - q_torch| accepted; float32 round-off of this network is ~1e-7.
MAX_ABS_DQ = 1e-5
# torch.export specialises a dimension of size 1 to a constant, so trace with a larger batch.
_EXAMPLE_ROWS = 2


def export_onnx(network: DECNet, path: str | Path, X_check: np.ndarray) -> dict[str, float]:
    """Export ``network`` to ONNX at ``path`` after checking onnxruntime agrees with PyTorch.

    The graph is written to a temporary file in the directory of ``path`` and renamed to ``path``
    only once verified, so a failed export leaves no file behind.

    Parameters
    ----------
    network : DECNet
        The fitted network (``DEC.network_``); it is not modified.
    path : str or Path
        Destination ``.onnx`` file; its directory must exist.
    X_check : ndarray of shape (n_samples, n_features)
        Raw features on which onnxruntime (CPU) and PyTorch must agree; a few thousand rows suffice.

    Returns
    -------
    dict
        ``onnx_max_abs_dq`` (max |q_onnx - q_torch|), ``onnx_labels_match`` (fraction of equal
        labels) and ``onnx_check_rows`` (n_samples), ready to log as metrics.

    Raises
    ------
    ValueError
        If ``X_check`` is not a finite 2-D array with the network's number of features.
    RuntimeError
        If max |dq| exceeds ``MAX_ABS_DQ`` or any label differs.
    """
    path = Path(path)
    X_check = _check_features(X_check, n_features=network.offset.shape[0])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_onnx(network, tmp)
        check = verify_onnx(network, tmp, X_check)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return check


def verify_onnx(network: DECNet, path: str | Path, X_check: np.ndarray) -> dict[str, float]:
    """Compare onnxruntime (CPU) on the graph at ``path`` with ``network`` on ``X_check``.

    Parameters
    ----------
    network : DECNet
    path : str or Path
        An ONNX file with the input and outputs written by ``export_onnx``.
    X_check : ndarray of shape (n_samples, n_features)

    Returns
    -------
    dict
        As for ``export_onnx``.

    Raises
    ------
    RuntimeError
        If max |dq| exceeds ``MAX_ABS_DQ`` or any label differs; the message gives the figures.
    """
    X_check = _check_features(X_check, n_features=network.offset.shape[0])
    ort = _require("onnxruntime", pip_name="onnxruntime-gpu (or onnxruntime; never both)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q_onnx, labels_onnx, _ = session.run(list(OUTPUT_NAMES), {INPUT_NAME: X_check})
    with torch.no_grad():
        q_torch, labels_torch, _ = network(torch.from_numpy(X_check))
    check = {
        "onnx_max_abs_dq": float(np.abs(q_onnx - q_torch.numpy()).max()),
        "onnx_labels_match": float((labels_onnx == labels_torch.numpy()).mean()),
        "onnx_check_rows": float(len(X_check)),
    }
    if check["onnx_max_abs_dq"] > MAX_ABS_DQ or check["onnx_labels_match"] < 1.0:
        raise RuntimeError(
            f"ONNX graph disagrees with PyTorch on {len(X_check)} rows: max |dq| = "
            f"{check['onnx_max_abs_dq']:.3g} (must be <= {MAX_ABS_DQ:g}), labels match on "
            f"{check['onnx_labels_match']:.2%} of rows (must be 100%)"
        )
    return check


def _write_onnx(network: DECNet, path: Path) -> None:
    """Trace ``network`` with the dynamo exporter into one file with a dynamic batch axis."""
    _require("onnxscript", pip_name="onnxscript")  # the dynamo exporter builds graphs with it
    example = torch.zeros(_EXAMPLE_ROWS, network.offset.shape[0])  # (batch, n_features)
    torch.onnx.export(
        network,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        external_data=False,  # one self-contained file instead of model.onnx + model.onnx.data
        dynamo=True,
        verbose=False,
    )


def _check_features(X: np.ndarray, *, n_features: int) -> np.ndarray:
    """``X`` as a C-contiguous float32 array after checking shape and finiteness."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != n_features:
        raise ValueError(
            f"X_check must have shape (n_samples >= 1, {n_features}) to match the network; "
            f"got {X.shape}"
        )
    n_bad = int((~np.isfinite(X)).sum())
    if n_bad:
        raise ValueError(f"X_check must be finite; it has {n_bad} NaN or infinite values")
    return X


def _require(module: str, *, pip_name: str):
    """Import ``module`` or raise ImportError saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs {module}: pip install {pip_name}") from e
