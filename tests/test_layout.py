"""The architecture as the imports show it: entry points -> lifecycle -> tracking -> estimator -> pretraining ->
settings -> params -> checkpoint/export/initialisation -> training -> objectives/model, and only the MLflow-facing
layers import mlflow."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A module may import only modules of a lower layer. A new module gets a layer here.
LAYERS = {
    "dec_mlflow.cli": 11, "serving.server": 11,  # entry points: parse options, call one stage / serve
    "dec_mlflow.lifecycle_experiments": 10,  # the paper's experiments as stages
    "dec_mlflow.lifecycle": 9,  # the lifecycle's stages
    "dec_mlflow.tracking": 8, "dec_mlflow.experiments": 8, "serving.model_io": 8,
    "dec_mlflow.scoring": 8,  # batch scoring of a logged model (serving.loading, spark_udf)
    "dec_mlflow.estimator": 7,
    "dec_mlflow.pretraining": 6,  # fit's autoencoder: pretrained, selected or untrained
    "dec_mlflow.settings": 5,  # what the parameters resolve to on the data
    "dec_mlflow.params": 4,  # the table of the estimator's parameters and their rules
    "dec_mlflow.trust": 4,  # label-free scores; the reruns are mixtures of the initialisation's map
    "dec_mlflow.export": 3, "dec_mlflow.initialisation": 3,
    "dec_mlflow.checkpoint": 3,  # checkpoint files, the pretrained autoencoder and an unfinished pretraining
    "dec_mlflow.training": 2,
    "serving.loading": 2,  # loads a logged model with the installed serving code
    "dec_mlflow.model": 1, "dec_mlflow.callbacks": 1, "dec_mlflow.data": 1, "dec_mlflow.plots": 1,
    "dec_mlflow.distributed": 1,  # collectives (no-ops in one process), torchrun
    "dec_mlflow.objectives": 0, "dec_mlflow.metrics": 0, "dec_mlflow.corpora": 0, "dec_mlflow.paper": 0,
    "dec_mlflow.scaling": 1, "dec_mlflow.rows": 0,
    "dec_mlflow.augment": 2,  # image transforms and image-shape inference (uses scaling.auto_scaling)
    "dec_mlflow.presets": 0, "dec_mlflow.environment": 0,
    "serving.onnx_pyfunc": 0,  # runs in the serving environment: imports nothing of ours
}
MLFLOW_IMPORTERS = {"dec_mlflow.tracking", "dec_mlflow.lifecycle", "dec_mlflow.lifecycle_experiments",
                    "serving.model_io", "serving.onnx_pyfunc", "serving.loading", "serving.server",
                    "dec_mlflow.scoring"}


def imports(path: Path) -> set[str]:
    """Top-level package modules imported by the file (``from dec_mlflow import x`` counts as dec_mlflow.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("dec_mlflow", "serving"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for package in ("dec_mlflow", "serving")
            for p in sorted((REPO / package).glob("*.py")) if p.stem != "__init__"}


def test_every_module_has_a_layer():
    assert set(modules()) == set(LAYERS)


def test_imports_point_one_way_down_the_layers():
    for name, path in modules().items():
        ours = {m for m in imports(path) if m in LAYERS}
        upward = sorted(m for m in ours if LAYERS[m] >= LAYERS[name])
        assert not upward, f"{name} (layer {LAYERS[name]}) imports {upward}"


def test_only_the_mlflow_facing_layers_import_mlflow():
    importers = {name for name, path in modules().items()
                 if any(m == "mlflow" or m.startswith("mlflow.") for m in imports(path))}
    assert importers == MLFLOW_IMPORTERS
