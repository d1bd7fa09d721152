"""The training loops keep every tensor on the device of their input (no GPU needed to check it).

The loops run for real on FakeTensors (torch's shape-and-device-only tensors) placed on the ``meta``
device, which stands in for a GPU: an operation mixing a tensor the loop made on the CPU with the
input's raises "FakeTensor is wrapped to wrong device", as CUDA would raise on a real GPU. Fake
tensors have no values, so the loops' ``float(...)`` reads return a finite stand-in.
"""

from __future__ import annotations

import builtins
import contextlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from dec_mlflow import training
from dec_mlflow.callbacks import Callback
from dec_mlflow.model import Autoencoder

DEVICE = "meta"  # not the CPU: the stand-in for cuda


@pytest.fixture
def fake_device(monkeypatch):
    """A FakeTensorMode, value reads patched, and the device types autocast was asked for."""
    monkeypatch.setattr(training, "float", lambda v: 0.5 if isinstance(v, FakeTensor) else builtins.float(v), raising=False)
    monkeypatch.setattr(training, "int", lambda v: 0 if isinstance(v, FakeTensor) else builtins.int(v), raising=False)
    monkeypatch.setattr(FakeTensor, "numpy", lambda t: np.zeros(t.shape, np.int64), raising=False)
    autocast_devices = []

    def record_autocast(device_type, dtype=None, **kwargs):
        autocast_devices.append((device_type, dtype))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", record_autocast)
    with FakeTensorMode() as mode:
        yield mode, autocast_devices


def on_device(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every parameter replaced by a fake one on DEVICE (``.to`` cannot make fakes move)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.empty(p.shape, device=DEVICE)))
    return module


OPT = dict(batch_size=16, lr=0.1, momentum=0.9, lr_schedule="constant", callback=Callback())


def test_the_harness_catches_a_tensor_left_on_the_cpu(fake_device):
    x = torch.empty(64, 8, device=DEVICE)
    total = torch.zeros(())  # the bug the loops once had: an accumulator on the CPU
    with pytest.raises(RuntimeError, match="FakeTensor is wrapped to wrong device, found cpu, expected meta"):
        total += x.sum()  # noqa: B018


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_pretraining_keeps_to_the_input_device_and_autocasts_there(fake_device, precision):
    _, autocast_devices = fake_device
    x = torch.empty(64, 8, device=DEVICE)
    ae = on_device(Autoencoder((8, 6, 3)))
    training.pretrain_end_to_end(ae, x, epochs=2, precision=precision, **OPT)
    training.pretrain_layerwise(on_device(Autoencoder((8, 6, 3))), x, dropout=0.2, epochs=1, precision=precision, **OPT)
    assert all(p.device.type == DEVICE for p in ae.parameters())
    # bf16 means bf16 on the input's device (a GPU too), never a CPU autocast around GPU matmuls
    expected = [(DEVICE, torch.bfloat16)] if precision == "bf16" else []
    assert set(autocast_devices) == set(expected) and (len(autocast_devices) > 0) == (precision == "bf16")


def test_distillation_and_self_training_keep_to_the_input_device(fake_device):
    x = torch.empty(64, 8, device=DEVICE)
    ae = on_device(Autoencoder((8, 6, 3)))
    centroids = torch.nn.Parameter(torch.empty(4, 3, device=DEVICE))
    teacher = torch.empty(64, 4, device=DEVICE)
    train = dict(alpha=1.0, batch_size=16, lr=0.01, momentum=0.9, callback=Callback())
    training.distill(ae.encoder, centroids, x, teacher, n_iter=8, **train)
    for variant in ({}, {"train_encoder": False}, {"decoder": ae.decoder}):
        result = training.self_train(ae.encoder, centroids, x, update_interval=3, tol=0.001, max_iter=6, **variant, **train)
        assert result.q.device.type == DEVICE and result.n_iter > 0
