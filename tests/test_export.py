"""ONNX export: onnxruntime matches PyTorch at every batch size, and a disagreeing graph is refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import make_blobs
from torch import nn

from dec_mlflow.export import MAX_ABS_DQ, NEAR_TIE, export_onnx, top_two_gap, verify_onnx
from dec_mlflow.model import DECNet

from conftest import BLOB_CLUSTERS as N_CLUSTERS, BLOB_FEATURES as N_FEATURES


@pytest.fixture(scope="module")
def X_new() -> np.ndarray:
    """3000 rows from the same blobs (same centres), unseen in training; float64 like user data."""
    return make_blobs(3000, n_features=N_FEATURES, centers=N_CLUSTERS, random_state=0)[0]


@pytest.fixture(scope="module")
def exported(fitted, X_new, tmp_path_factory):
    """(path, check dict) of the fitted network exported once for the module."""
    path = tmp_path_factory.mktemp("export") / "dec.onnx"
    return path, export_onnx(fitted.network_, path, X_new[:500])


class _ShiftWhenExported(nn.Module):
    """Identity in eager PyTorch, +0.5 inside a traced graph.

    ``torch.compiler.is_exporting()`` is the documented switch for export-only code paths; using it
    makes the exported graph compute something else than the eager network, as a branch traced
    the wrong way would.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + 0.5 if torch.compiler.is_exporting() else z


def test_export_writes_one_file_and_returns_parity_figures(exported):
    path, check = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["dec.onnx"]  # no .data file, no temp file
    assert set(check) == {"onnx_max_abs_dq", "onnx_labels_match", "onnx_check_rows", "onnx_near_ties", "onnx_checked_on_cuda"}
    assert check["onnx_checked_on_cuda"] == 0.0  # the default check runs on the CPU
    assert check["onnx_max_abs_dq"] <= MAX_ABS_DQ
    assert check["onnx_labels_match"] == 1.0
    assert check["onnx_check_rows"] == 500
    assert check["onnx_near_ties"] == 0  # four well-separated blobs: every label is decided


def test_exported_graph_has_named_tensors_and_dynamic_batch(exported):
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    (x,) = session.get_inputs()
    assert (x.name, x.type, x.shape[1]) == ("x", "tensor(float)", N_FEATURES)
    assert isinstance(x.shape[0], str)  # symbolic batch dimension
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert outputs == {"q": "tensor(float)", "labels": "tensor(int64)", "embedding": "tensor(float)"}


@pytest.mark.parametrize("n_rows", [1, 7, 3000])
def test_onnxruntime_matches_pytorch_estimator(fitted, exported, X_new, n_rows):
    X = X_new[:n_rows]
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    q, labels, embedding = session.run(None, {"x": X.astype(np.float32)})
    assert q.shape == (n_rows, N_CLUSTERS) and labels.dtype == np.int64
    np.testing.assert_allclose(q, fitted.predict_proba(X), rtol=0, atol=MAX_ABS_DQ)
    np.testing.assert_array_equal(labels, fitted.predict(X))
    np.testing.assert_allclose(embedding, fitted.transform(X), rtol=0, atol=1e-4)
    check = verify_onnx(fitted.network_, exported[0], X)
    assert check["onnx_labels_match"] == 1.0 and check["onnx_check_rows"] == n_rows


def test_export_refuses_a_graph_that_disagrees_and_leaves_no_file(fitted, X_new, tmp_path):
    net = fitted.network_
    diverging = DECNet(nn.Sequential(net.encoder, _ShiftWhenExported()), net.centroids, net.offset,
                       net.scale, net.alpha).eval()
    with pytest.raises(RuntimeError, match=r"disagrees with PyTorch on 300 rows: max \|dq\| = .* \(must be <= 0\.0001\), "
                                           r"labels match on .* of the 300 rows whose two largest q differ by more than 0\.0002"):
        export_onnx(diverging, tmp_path / "dec.onnx", X_new[:300])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("X", "message"),
    [
        (np.ones((5, N_FEATURES + 1)), r"X_check must have shape \(n_samples >= 1, 20\) .*; got \(5, 21\)"),
        (np.ones((0, N_FEATURES)), r"X_check must have shape .*; got \(0, 20\)"),
        (np.full((5, N_FEATURES), np.nan), r"X_check must be finite; it has 100 NaN or infinite values"),
    ],
)
def test_export_rejects_bad_check_data_before_writing(fitted, tmp_path, X, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(fitted.network_, tmp_path / "dec.onnx", X)
    assert list(tmp_path.iterdir()) == []


def _with_nan(network: DECNet, where: str) -> DECNet:
    """A copy of ``network`` with one NaN in its first encoder weight or in its centroids."""
    net = DECNet.from_checkpoint(network.checkpoint())
    with torch.no_grad():
        (net.encoder[0].weight if where == "encoder" else net.centroids)[0, 0] = float("nan")
    return net


@pytest.mark.parametrize(
    ("where", "counts"),
    [("encoder", r"\(1200 in q, 1200 in embedding\)"), ("centroids", r"\(1200 in q\)")],  # 300 rows x 4 clusters / dims
    ids=["encoder", "centroids"],
)
def test_export_refuses_a_network_with_nan_weights_and_leaves_no_file(fitted, X_new, tmp_path, where, counts):
    # before the fix, max |dq| = NaN passed the gate: NaN > MAX_ABS_DQ is False
    with pytest.raises(RuntimeError, match=r"^the PyTorch network outputs NaN or infinite values on the 300 check rows "
                                           rf"{counts}; refusing to export a model that cannot score"):
        export_onnx(_with_nan(fitted.network_, where), tmp_path / "dec.onnx", X_new[:300])
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_an_exported_graph_with_nan_injected(fitted, exported, X_new, tmp_path):
    model = onnx.load(str(exported[0]))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight matrix
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(tmp_path / "nan.onnx"))
    with pytest.raises(RuntimeError, match=r"^the ONNX graph on CPUExecutionProvider outputs NaN or infinite values "
                                           r"on the 200 check rows \(\d+ in q, \d+ in embedding\)"):
        verify_onnx(fitted.network_, tmp_path / "nan.onnx", X_new[:200])


def test_top_two_gap_is_the_margin_of_each_rows_label():
    q = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.1, 0.5, 0.4]], dtype=np.float32)
    np.testing.assert_allclose(top_two_gap(q), [0.5, 0.0, 0.1], atol=1e-7)
    assert top_two_gap(np.ones((2, 1), np.float32)).tolist() == [np.inf, np.inf]  # one cluster: never a tie


def _near_tie_network(fitted) -> DECNet:
    """The fitted network with its second centroid moved onto its first, 16 float32 steps away: the points of
    the two clusters are near-ties, whose labels PyTorch's and onnxruntime's rounding decide differently."""
    net = DECNet.from_checkpoint(fitted.network_.checkpoint())
    moved = net.centroids[0].detach().numpy().copy()
    for _ in range(16):
        moved = np.nextafter(moved, np.inf, dtype=np.float32)
    with torch.no_grad():
        net.centroids[1] = torch.from_numpy(moved)
    return net


def test_near_ties_whose_labels_flip_within_the_tolerance_are_counted_not_refused(fitted, X_new, tmp_path):
    net = _near_tie_network(fitted)
    X = X_new[:2000].astype(np.float32)
    with torch.no_grad():
        q_torch, labels_torch, _ = (t.numpy() for t in net(torch.from_numpy(X)))
    near = top_two_gap(q_torch) <= NEAR_TIE
    assert 0 < near.sum() < len(X)  # the two clusters' points tie, the other clusters' do not
    path = tmp_path / "dec.onnx"
    export_onnx(net, path, X)
    real = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    q_onnx, labels_onnx, _ = real.run(None, {"x": X})
    assert not (labels_onnx != labels_torch)[~near].any() and np.abs(q_onnx - q_torch).max() <= MAX_ABS_DQ

    class RoundingFlips:  # what float rounding does on some CPUs and not on others: the tied rows' labels swap
        def get_providers(self):
            return real.get_providers()

        def run(self, names, feed):
            q, labels, z = real.run(names, feed)
            tied = top_two_gap(q) <= NEAR_TIE
            return q, np.where(tied, np.where(labels == 0, 1, np.where(labels == 1, 0, labels)), labels), z

    check = verify_onnx(net, path, X, open_sessions=lambda _: [RoundingFlips()])
    assert check["onnx_near_ties"] == near.sum() and check["onnx_labels_match"] == 1.0


def test_a_wrong_label_output_is_refused_outside_the_near_ties(fitted, X_new, tmp_path):
    net = _near_tie_network(fitted)
    X = X_new[:500].astype(np.float32)
    path = tmp_path / "dec.onnx"
    export_onnx(net, path, X)
    real = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    class LabelsOffByOne:  # q right, labels wrong: a graph whose label output is wired to something else
        def get_providers(self):
            return real.get_providers()

        def run(self, names, feed):
            q, labels, z = real.run(names, feed)
            return q, (labels + 1) % q.shape[1], z

    n_near = int((top_two_gap(net(torch.from_numpy(X))[0].detach().numpy()) <= NEAR_TIE).sum())
    with pytest.raises(RuntimeError, match=rf"labels match on 0\.00% of the {500 - n_near} rows whose two largest q differ "
                                           rf"by more than 0\.0002 \(must be 100%; {n_near} near-ties not compared\)"):
        verify_onnx(net, path, X, open_sessions=lambda _: [LabelsOffByOne()])
