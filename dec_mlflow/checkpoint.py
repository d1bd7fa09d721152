"""Checkpoint files that hold only tensors and a JSON of settings, loaded without running code, and what
is kept in them: a pretrained autoencoder (:class:`PretrainedAutoencoder`) and an unfinished pretraining
(:class:`PretrainCheckpoint`, made by :class:`Checkpoints` from the training loops' state).

A pickle can run arbitrary code when it is loaded, so a checkpoint fetched from a shared tracking
server must not be unpickled freely. The files written here are ``torch.save`` archives of a plain
dict (format name, settings as a JSON string, a flat dict of tensors) and are read back with
``torch.load(weights_only=True)``, whose restricted unpickler accepts only tensors and primitive
containers and refuses anything else (a class, a function call) before it runs.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dec_mlflow.callbacks import Callback, CallbackList
from dec_mlflow.model import Autoencoder
from dec_mlflow.training import LoopState

FORMAT = "dec-mlflow-tensors-v1"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], settings: dict) -> None:
    """Write ``tensors`` and the JSON-serialisable ``settings`` to ``path``.

    Parameters
    ----------
    path : str or Path
    tensors : dict of str to Tensor
        Saved as CPU tensors.
    settings : dict
        Plain JSON values (numbers, strings, lists, dicts) describing how to use the tensors.
    """
    payload = {
        "format": FORMAT,
        "settings": json.dumps(settings),
        "tensors": {name: t.detach().cpu() for name, t in tensors.items()},
    }
    torch.save(payload, Path(path))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors` without executing anything it contains.

    Returns
    -------
    tensors : dict of str to Tensor (on the CPU)
    settings : dict

    Raises
    ------
    ValueError
        If the file needs pickle code execution to load (refused: it was not written by
        :func:`save_tensors`, e.g. an old checkpoint or a crafted file), is not a checkpoint at
        all, or does not have the expected layout. The message names the file.
    """
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol only warns before being refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; keep its one informative sentence ("Unsupported global: GLOBAL exec ...")
        detail = str(e).partition("WeightsUnpickler error:")[2].strip()
        reason = detail.splitlines()[0].split(". ", 1)[0] if detail else "not tensors only"
        raise ValueError(
            f"{path}: refused to load: not a dec-mlflow tensor checkpoint, and unpickling it could run code "
            f"({reason}); pretrain again to get a checkpoint this version writes"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a dec-mlflow checkpoint: {first}") from None
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise ValueError(f"{path} is not a dec-mlflow checkpoint (format {FORMAT!r} expected)")
    tensors, settings = payload.get("tensors"), payload.get("settings")
    if not (isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())):
        raise ValueError(f"{path}: 'tensors' must map names to tensors")
    try:
        settings = json.loads(settings)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'settings' must be a JSON object") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: 'settings' must be a JSON object")
    return tensors, settings


# ------------------------------------------------------------------ what pretraining writes and resumes from
@dataclass
class PretrainedAutoencoder:
    """What pretraining produces: the autoencoder and the input scaling it was trained under.

    ``trained`` is False for the seeded, untrained autoencoder of a fit with ``pretrain_epochs=0``,
    whose initial clustering is then made on the input instead of the embedding.
    """

    autoencoder: Autoencoder
    offset: np.ndarray  # (n_features,) subtracted from raw features
    scale: np.ndarray  # (n_features,) multiplied after the offset
    loss: float  # mean reconstruction loss of the last pretraining epoch
    lr: float = float("nan")  # the pretraining learning rate that converged (after any restarts)
    trained: bool = True

    @property
    def n_features(self) -> int:
        return self.autoencoder.dims[0]

    def save(self, path: str | Path) -> None:
        """Write dims, weights, scaling, loss and rate to ``path`` as tensors + JSON (no pickle, see ``load``)."""
        save_tensors(path, *self._payload())

    def _payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"autoencoder.{k}": v for k, v in self.autoencoder.state_dict().items()}
        tensors.update(offset=torch.from_numpy(np.asarray(self.offset)), scale=torch.from_numpy(np.asarray(self.scale)))
        return tensors, {"dims": list(self.autoencoder.dims), "loss": float(self.loss), "lr": float(self.lr)}

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedAutoencoder":
        """Read a checkpoint written by ``save``; a file that needs pickle to load is refused (ValueError)."""
        return cls._from_payload(*load_tensors(path), path)

    @classmethod
    def _from_payload(cls, tensors: dict[str, torch.Tensor], settings: dict, path) -> "PretrainedAutoencoder":
        prefix = "autoencoder."
        try:
            ae = Autoencoder(settings["dims"])
            ae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            offset, scale, loss = tensors["offset"].numpy(), tensors["scale"].numpy(), float(settings["loss"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a checkpoint of something else
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path} is not a pretrained autoencoder checkpoint: {detail}") from None
        return cls(ae, offset, scale, loss, float(settings.get("lr", float("nan"))))


@dataclass
class PretrainCheckpoint:
    """An unfinished pretraining: the autoencoder so far and what continuing it exactly needs.

    ``DEC.pretrain`` offers one to ``callback.on_checkpoint`` after every epoch and continues from
    one given as ``resume``. Saved in the format of :class:`PretrainedAutoencoder` (tensors + JSON,
    loaded without pickle) with the optimizer's momentum, the generator states and the position.
    """

    pretrained: PretrainedAutoencoder  # weights after `state.epoch` epochs of `state.stage`; lr: the rate in use
    attempt: int  # restarts at a lower rate made before this one (0: the first attempt)
    state: LoopState  # stage, epochs done, optimizer and generator states ('augment': DEC-DA's generator)

    def save(self, path: str | Path) -> None:
        tensors, settings = self.pretrained._payload()
        for i, entry in self.state.optimizer["state"].items():
            tensors.update({f"optimizer.{i}.{k}": v for k, v in entry.items()})  # SGD: momentum_buffer
        tensors.update({f"rng.{k}": v for k, v in self.state.rng.items()})
        settings["resume"] = {"stage": self.state.stage, "epoch": self.state.epoch, "loss": self.state.loss,
                              "attempt": self.attempt, "param_groups": self.state.optimizer["param_groups"]}
        save_tensors(path, tensors, settings)

    @classmethod
    def load(cls, path: str | Path) -> "PretrainCheckpoint":
        """Read a file written by ``save``; ValueError naming the file if it is not one (or needs pickle)."""
        tensors, settings = load_tensors(path)
        try:
            position = settings["resume"]
            optimizer: dict[int, dict] = {}
            for name, t in tensors.items():
                if name.startswith("optimizer."):
                    _, index, key = name.split(".", 2)
                    optimizer.setdefault(int(index), {})[key] = t
            state = LoopState(str(position["stage"]), int(position["epoch"]), float(position["loss"]),
                              {"state": optimizer, "param_groups": list(position["param_groups"])},
                              {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")})
            attempt = int(position["attempt"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a pretraining checkpoint: {type(e).__name__} {e}") from None
        weights = {k: v for k, v in tensors.items() if not k.startswith(("optimizer.", "rng."))}
        return cls(PretrainedAutoencoder._from_payload(weights, settings, path), attempt, state)


class Checkpoints(CallbackList):
    """Passes every hook on, turning the loops' :class:`LoopState` into a whole :class:`PretrainCheckpoint`."""

    def __init__(self, callback: Callback, offset, scale, lr: float, attempt: int, transform):
        super().__init__([callback])
        self.offset, self.scale, self.lr, self.attempt, self.transform = offset, scale, lr, attempt, transform
        self.autoencoder: Autoencoder | None = None  # set when it is built

    def on_checkpoint(self, stage, epoch, state):
        def checkpoint() -> PretrainCheckpoint:
            loop = state()
            if self.transform is not None:
                loop.rng["augment"] = self.transform.keywords["generator"].get_state()
            return PretrainCheckpoint(PretrainedAutoencoder(self.autoencoder, self.offset, self.scale, loop.loss, self.lr),
                                      self.attempt, loop)

        super().on_checkpoint(stage, epoch, checkpoint)
