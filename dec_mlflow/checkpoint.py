"""Checkpoint files that hold only tensors and a JSON of settings, loaded without running code.

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
from pathlib import Path

import torch

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
