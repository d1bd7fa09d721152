"""Networks: the stacked autoencoder and the DEC network (scaling + encoder + centroid head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dec_mlflow.objectives import soft_assignment


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with ReLU between them and none after the last (linear output)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def scale_embedding(encoder: nn.Sequential, factor: float, decoder: nn.Sequential | None = None) -> None:
    """Multiply the embedding an encoder produces by ``factor``, in place, by scaling its last linear layer.

    The embedding is linear (no ReLU after the last layer), so this is exact; a ``decoder`` reading
    that embedding gets its first layer divided by ``factor`` and reconstructs exactly as before.
    """
    last = [m for m in encoder if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        last.bias.mul_(factor)
        if decoder is not None:
            first = [m for m in decoder if isinstance(m, nn.Linear)][0]
            first.weight.div_(factor)


class Autoencoder(nn.Module):
    """Symmetric autoencoder ``d - h1 - ... - e - ... - h1 - d`` (paper section 3.2).

    ReLU everywhere except the embedding and the reconstruction, which are linear as in the paper,
    so the embedding is not clipped at zero and reconstructions may take any real value.

    Parameters
    ----------
    dims : sequence of int
        ``(n_features, h1, ..., embedding_dim)``; the paper uses ``(d, 500, 500, 2000, 10)``.
    """

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.encoder = _mlp(self.dims)
        self.decoder = _mlp(self.dims[::-1])

    def encoder_layers(self) -> list[nn.Linear]:
        return [m for m in self.encoder if isinstance(m, nn.Linear)]

    def decoder_layers(self) -> list[nn.Linear]:
        return [m for m in self.decoder if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``: (n_samples, n_features) -> (n_samples, n_features)."""
        return self.decoder(self.encoder(x))


class DECNet(nn.Module):
    """The deployable DEC model: raw features in, soft assignments, labels and embedding out.

    Holds the affine input scaling learned at fit time, so callers send raw features, the
    encoder, and the centroids ``mu`` as a parameter (they are trained together, paper eq. 4-6).

    Parameters
    ----------
    encoder : nn.Module mapping (n, n_features) to (n, embedding_dim)
    centroids : Tensor of shape (n_clusters, embedding_dim)
    offset, scale : Tensor of shape (n_features,)
        Input scaling ``(x - offset) * scale``.
    alpha : float
        Student's t degrees of freedom.
    """

    def __init__(
        self,
        encoder: nn.Module,
        centroids: torch.Tensor,
        offset: torch.Tensor,
        scale: torch.Tensor,
        alpha: float = 1.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.centroids = nn.Parameter(centroids.detach().clone())
        self.register_buffer("offset", offset.detach().clone().float())
        self.register_buffer("scale", scale.detach().clone().float())
        self.alpha = float(alpha)

    def checkpoint(self) -> dict:
        """Everything needed to rebuild this network with :meth:`from_checkpoint`."""
        dims = [m.in_features for m in self.encoder if isinstance(m, nn.Linear)] + [self.centroids.shape[1]]
        return {"encoder_dims": dims, "alpha": self.alpha, "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "DECNet":
        state = checkpoint["state_dict"]
        net = cls(_mlp(checkpoint["encoder_dims"]), state["centroids"], state["offset"], state["scale"], checkpoint["alpha"])
        net.load_state_dict(state)
        return net.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw features (n, n_features) -> q (n, n_clusters), labels (n,) int64, z (n, embedding_dim)."""
        z = self.encoder((x - self.offset) * self.scale)
        q = soft_assignment(z, self.centroids, self.alpha)
        return q, q.argmax(1), z
