"""The rank side of tests/test_distributed.py, in a module of its own: what the spawned processes
import stays light (no mlflow), so that they start quickly."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from conftest import SMALL
from sklearn.datasets import make_blobs

from dec_mlflow import DEC
from dec_mlflow.callbacks import Callback
from dec_mlflow.model import Autoencoder
from dec_mlflow.training import distill, self_train

FIT = {**SMALL, "init": "kmeans"}


def blobs():
    # 601 rows: the ranks' blocks of the full passes differ in size, and batches do not divide the data
    x, _ = make_blobs(601, n_features=20, centers=4, cluster_std=1.0, random_state=0)
    return x.astype(np.float32)


def fixed_model():
    """An encoder and centroids of fixed seeded weights, for one update of the target P."""
    torch.manual_seed(3)
    encoder = Autoencoder((20, 32, 16, 4)).encoder
    centroids = torch.nn.Parameter(torch.randn(4, 4))
    return encoder, centroids


def one_update(x):
    encoder, centroids = fixed_model()
    return self_train(encoder, centroids, torch.from_numpy(x), alpha=1.0, batch_size=64, lr=0.01, momentum=0.9,
                      update_interval=10, tol=0.001, max_iter=0, callback=Callback())


def distilled(x):
    """Encoder weights and centroids after 12 steps of distillation towards a fixed seeded teacher."""
    encoder, centroids = fixed_model()
    teacher = torch.softmax(3 * torch.randn(x.shape[0], 4, generator=torch.Generator().manual_seed(4)), 1)
    distill(encoder, centroids, torch.from_numpy(x), teacher, alpha=1.0, batch_size=64, lr=0.01, momentum=0.9, n_iter=12,
            callback=Callback())
    return np.concatenate([p.detach().numpy().ravel() for p in [*encoder.parameters(), centroids]])


def rank_job(rank: int, world: int, folder: str) -> None:
    """One rank of the gloo job: a whole DEC fit, then one update of P, results saved per rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        x = blobs()
        dec = DEC(**FIT).fit(x)
        update = one_update(x)
        torch.manual_seed(5)  # the batches of distillation
        distill_weights = distilled(x)
        weights = {f"w_{k}": v.numpy() for k, v in dec.network_.state_dict().items()}
        np.savez(f"{folder}/rank{rank}.npz", centers=dec.cluster_centers_, labels=dec.labels_, n_iter=dec.n_iter_,
                 kl=dec.kl_loss_, pretrain_loss=dec.pretrain_loss_, p=update.p.numpy(), q=update.q.numpy(),
                 update_labels=update.labels, distilled=distill_weights, **weights)
    finally:
        dist.destroy_process_group()
