"""ONNX export of a fitted DEC network, verified against PyTorch before it is kept.

Reads a ``DECNet`` and a sample of raw features; writes one self-contained ``.onnx`` file with
input ``x`` (batch, n_features) float32 and outputs ``q`` (batch, n_clusters) float32,
``labels`` (batch,) int64 and ``embedding`` (batch, embedding_dim) float32.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dec_mlflow.model import DECNet

INPUT_NAME = "x"
OUTPUT_NAMES = ("q", "labels", "embedding")
# Largest |q_onnx - q_torch| accepted. float32 round-off of this network is ~1e-7 on most data, but
# reached 1.0e-05 on a two-process MNIST run (different GEMM summation orders on both sides); a wrong
# graph differs by 1e-3 or more.
MAX_ABS_DQ = 1e-4
# Rows whose two largest q (in PyTorch) differ by at most this are near-ties: each of the two may move by
# MAX_ABS_DQ, so their order, hence the label, may legitimately differ between PyTorch and onnxruntime. Labels
# are compared on every other row (tests/test_export.py: two centroids 16 float32 steps apart flip 155 of 2,000 labels).
NEAR_TIE = 2 * MAX_ABS_DQ
CUDA = "CUDAExecutionProvider"
# torch.export specialises a dimension of size 1 to a constant, so trace with a larger batch.
_EXAMPLE_ROWS = 2


def export_onnx(network: DECNet, path: str | Path, X_check: np.ndarray, *,
                open_sessions: Callable[[str], list] | None = None) -> dict[str, float]:
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
        Raw features on which onnxruntime and PyTorch must agree; a few thousand rows suffice.
    open_sessions : callable, optional
        ``open_sessions(onnx_path) -> [onnxruntime.InferenceSession, ...]``: the sessions to check,
        i.e. the execution providers the model will be served on (``serving.model_io`` passes the
        CPU plus CUDA where CUDA is usable). Default: one CPU session.

    Returns
    -------
    dict
        ``onnx_max_abs_dq`` (max |q_onnx - q_torch| over all sessions), ``onnx_labels_match``
        (smallest fraction of equal labels among the rows that are not near-ties), ``onnx_check_rows``
        (n_samples), ``onnx_near_ties`` (rows whose two largest q differ by at most ``NEAR_TIE``,
        whose labels are not compared) and ``onnx_checked_on_cuda`` (1.0 if a
        CUDAExecutionProvider session was among those checked), ready to log as metrics.

    Raises
    ------
    ValueError
        If ``X_check`` is not a finite 2-D array with the network's number of features.
    RuntimeError
        If PyTorch or onnxruntime output NaN or infinite values, max |dq| exceeds ``MAX_ABS_DQ``
        or any label differs outside the near-ties.
    """
    path = Path(path)
    X_check = _check_features(X_check, n_features=network.offset.shape[0])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_onnx(network, tmp)
        check = verify_onnx(network, tmp, X_check, open_sessions=open_sessions)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return check


def verify_onnx(network: DECNet, path: str | Path, X_check: np.ndarray, *,
                open_sessions: Callable[[str], list] | None = None) -> dict[str, float]:
    """Compare onnxruntime on the graph at ``path`` with ``network`` on ``X_check``.

    Parameters
    ----------
    network : DECNet
    path : str or Path
        An ONNX file with the input and outputs written by ``export_onnx``.
    X_check : ndarray of shape (n_samples, n_features)
    open_sessions : callable, optional
        As for ``export_onnx``; default one CPU session.

    Returns
    -------
    dict
        As for ``export_onnx``.

    Raises
    ------
    RuntimeError
        If either side outputs NaN or infinite values (a comparison with NaN is False, so this is
        checked first), max |dq| exceeds ``MAX_ABS_DQ`` or any label differs on a row that is not a
        near-tie (see ``NEAR_TIE``); the message names the execution provider and gives the figures.
    """
    X_check = _check_features(X_check, n_features=network.offset.shape[0])
    with torch.no_grad():
        q_torch, labels_torch, z_torch = (t.numpy() for t in network(torch.from_numpy(X_check)))
    _refuse_non_finite("the PyTorch network", len(X_check), q=q_torch, embedding=z_torch)
    decided = top_two_gap(q_torch) > NEAR_TIE  # (n_samples,): rows whose label rounding cannot flip
    n_compared = int(decided.sum())
    sessions = (open_sessions or _cpu_sessions)(str(path))
    if not sessions:
        raise ValueError("open_sessions returned no onnxruntime session to check")
    check = {"onnx_max_abs_dq": 0.0, "onnx_labels_match": 1.0, "onnx_check_rows": float(len(X_check)),
             "onnx_near_ties": float(len(X_check) - n_compared), "onnx_checked_on_cuda": 0.0}
    for session in sessions:
        provider = session.get_providers()[0]
        q_onnx, labels_onnx, z_onnx = session.run(list(OUTPUT_NAMES), {INPUT_NAME: X_check})
        _refuse_non_finite(f"the ONNX graph on {provider}", len(X_check), q=q_onnx, embedding=z_onnx)
        dq = float(np.abs(q_onnx - q_torch).max())
        match = float((labels_onnx[decided] == labels_torch[decided]).mean()) if n_compared else 1.0
        if not dq <= MAX_ABS_DQ or match < 1.0:
            raise RuntimeError(
                f"ONNX graph on {provider} disagrees with PyTorch on {len(X_check)} rows: max |dq| = "
                f"{dq:.3g} (must be <= {MAX_ABS_DQ:g}), labels match on {match:.2%} of the {n_compared} rows "
                f"whose two largest q differ by more than {NEAR_TIE:g} (must be 100%; "
                f"{len(X_check) - n_compared} near-ties not compared)"
            )
        check["onnx_max_abs_dq"] = max(check["onnx_max_abs_dq"], dq)
        check["onnx_labels_match"] = min(check["onnx_labels_match"], match)
        check["onnx_checked_on_cuda"] = max(check["onnx_checked_on_cuda"], float(provider == CUDA))
    return check


def top_two_gap(q: np.ndarray) -> np.ndarray:
    """(n_samples,) difference between the largest and the second largest q of each row (inf with one cluster)."""
    if q.shape[1] < 2:
        return np.full(q.shape[0], np.inf)
    top_two = np.partition(q, q.shape[1] - 2, axis=1)[:, -2:]  # (n_samples, 2): second largest, largest
    return top_two[:, 1] - top_two[:, 0]


def _refuse_non_finite(what: str, n_rows: int, **outputs: np.ndarray) -> None:
    """RuntimeError naming ``what`` if any of ``outputs`` holds NaN or infinite values."""
    bad = {name: int((~np.isfinite(a)).sum()) for name, a in outputs.items()}
    if any(bad.values()):
        counts = ", ".join(f"{n} in {name}" for name, n in bad.items() if n)
        raise RuntimeError(
            f"{what} outputs NaN or infinite values on the {n_rows} check rows ({counts}); refusing to "
            "export a model that cannot score (did training diverge?)"
        )


def _cpu_sessions(path: str) -> list:
    ort = _require("onnxruntime", pip_name="onnxruntime-gpu (or onnxruntime; never both)")
    return [ort.InferenceSession(path, providers=["CPUExecutionProvider"])]


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
