"""Safe artifacts: checkpoints hold tensors + JSON, and a file that needs pickle to load is refused unexecuted."""

from __future__ import annotations

import pickle

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dec_mlflow import DEC, tracking
from dec_mlflow.checkpoint import load_tensors, save_tensors
from dec_mlflow.cli import main
from dec_mlflow.estimator import PretrainedAutoencoder

from conftest import SMALL


class _CreatesFileWhenUnpickled:
    """Unpickling this runs ``exec``: what a crafted checkpoint on a shared server would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_torch_file(path, marker):
    """A torch.save archive (what a .pt checkpoint is) whose pickle calls exec when loaded."""
    torch.save({"format": "dec-mlflow-tensors-v1", "settings": "{}", "tensors": {}, "x": _CreatesFileWhenUnpickled(marker)}, path)
    return path


def _malicious_raw_pickle(path, marker):
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    return path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code-was-executed"


@pytest.mark.parametrize(
    ("make", "unsafe_load"),
    [(_malicious_torch_file, lambda p: torch.load(p, weights_only=False)), (_malicious_raw_pickle, lambda p: pickle.loads(p.read_bytes()))],
    ids=["torch-archive", "raw-pickle"],
)
def test_the_crafted_files_really_run_code_when_unpickled(tmp_path, marker, make, unsafe_load):
    # the control: with pickle allowed, loading runs the payload (so the refusals below are meaningful)
    unsafe_load(make(tmp_path / "evil.pt", marker))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("make", [_malicious_torch_file, _malicious_raw_pickle], ids=["torch-archive", "raw-pickle"])
@pytest.mark.parametrize(
    "load",
    [load_tensors, PretrainedAutoencoder.load, tracking.load_autoencoder],
    ids=["load_tensors", "PretrainedAutoencoder.load", "tracking.load_autoencoder"],
)
def test_a_crafted_pickle_is_refused_without_running(tmp_path, marker, make, load):
    path = make(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load: not a dec-mlflow tensor checkpoint, and unpickling it could run code \(Unsupported (global: GLOBAL exec|operand \d+).*\); pretrain again"):
        load(str(path))
    assert not marker.exists()


def test_a_checkpoint_of_the_old_pickled_format_is_refused(tmp_path):
    # what PretrainedAutoencoder.save wrote before: numpy arrays inside, loadable only with pickle
    torch.save({"dims": [4, 2], "state_dict": {}, "offset": np.zeros(4), "scale": np.ones(4), "loss": 0.1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old\.pt: refused to load: not a dec-mlflow tensor checkpoint, and unpickling it could run code .*pretrain again"):
        PretrainedAutoencoder.load(tmp_path / "old.pt")


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_text("not a checkpoint"), r"junk\.pt: refused to load: not a dec-mlflow tensor checkpoint"),
        (lambda p: p.write_bytes(b""), r"junk\.pt is not a dec-mlflow checkpoint: "),
        (lambda p: torch.save({"weights": torch.ones(2)}, p), r"junk\.pt is not a dec-mlflow checkpoint \(format"),
        (lambda p: save_tensors(p, {"w": torch.ones(2)}, {"dims": [3, 2]}),
         r"junk\.pt is not a pretrained autoencoder checkpoint: "),
    ],
    ids=["text", "empty", "other-torch-file", "other-tensors"],
)
def test_a_file_that_is_not_an_autoencoder_checkpoint_gets_one_line(tmp_path, write, message):
    write(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match=message) as info:
        PretrainedAutoencoder.load(tmp_path / "junk.pt")
    assert "\n" not in str(info.value)


def test_save_tensors_round_trip_keeps_dtypes_and_settings(tmp_path):
    tensors = {"w": torch.randn(3, 2), "offset": torch.from_numpy(np.arange(3.0))}
    save_tensors(tmp_path / "c.pt", tensors, {"dims": [3, 2], "alpha": 1.0})
    loaded, settings = load_tensors(tmp_path / "c.pt")
    assert settings == {"dims": [3, 2], "alpha": 1.0}
    assert loaded["offset"].dtype == torch.float64
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_pretrained_autoencoder_round_trip_is_exact(blobs, tmp_path):
    ae = DEC(**{**SMALL, "pretrain_epochs": 2}).pretrain(blobs[0])
    ae.save(tmp_path / "ae.pt")
    loaded = PretrainedAutoencoder.load(tmp_path / "ae.pt")
    assert loaded.autoencoder.dims == ae.autoencoder.dims and loaded.loss == ae.loss
    np.testing.assert_array_equal(loaded.offset, ae.offset)
    np.testing.assert_array_equal(loaded.scale, ae.scale)
    for (name, a), (_, b) in zip(ae.autoencoder.state_dict().items(), loaded.autoencoder.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def tmp_store(tmp_path):
    """A fresh sqlite store (runs go to its Default experiment); the previous tracking URI comes back after."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.search_experiments()  # creates the tables now, so their log lines do not mix with a command's output
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def test_network_artifact_round_trip_and_a_crafted_one_is_refused(fitted, tmp_store, marker):
    with mlflow.start_run() as good:
        tracking.log_network(fitted.network_)
    net = tracking.load_network(good.info.run_id)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, fitted.n_features_in_)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], fitted.network_(x)[0], rtol=0, atol=0)
    # someone with write access to the artifact store replaces the checkpoint
    evil = _malicious_torch_file(tmp_store / "dec_network.pt", marker)
    with mlflow.start_run() as bad:
        mlflow.log_artifact(str(evil), artifact_path="network")
    with pytest.raises(ValueError, match=r"dec_network\.pt: refused to load: not a dec-mlflow tensor checkpoint, and unpickling it could run code"):
        tracking.load_network(bad.info.run_id)
    assert not marker.exists()


def test_cli_refuses_a_crafted_autoencoder_with_one_line_and_a_failed_run(tmp_store, marker, blobs):
    np.save(tmp_store / "x.npy", blobs[0])
    evil = _malicious_torch_file(tmp_store / "evil.pt", marker)
    result = CliRunner().invoke(main, ["cluster", "--dataset", str(tmp_store / "x.npy"), "--n_clusters", "4",
                                       "--hidden_dims", "8,4", "--autoencoder", str(evil)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "refused to load: not a dec-mlflow tensor checkpoint, and unpickling it could run code" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists()
    runs = mlflow.search_runs(output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
