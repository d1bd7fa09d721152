"""Installs where users are: exactly one onnxruntime wheel per platform, chosen by environment markers, on the
Python the tests need, within the floors of pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from serving.model_io import pinned_requirements

REPO = Path(__file__).resolve().parents[1]
ORT_WHEELS = {"onnxruntime", "onnxruntime-gpu"}
# (sys_platform, platform_system, platform_machine) as each platform reports them -> the wheel that exists there
PLATFORMS = {
    "linux-x86_64": (("linux", "Linux", "x86_64"), "onnxruntime-gpu"),
    "windows-amd64": (("win32", "Windows", "AMD64"), "onnxruntime-gpu"),
    "linux-aarch64": (("linux", "Linux", "aarch64"), "onnxruntime"),
    "macos-arm64": (("darwin", "Darwin", "arm64"), "onnxruntime"),
    "macos-x86_64": (("darwin", "Darwin", "x86_64"), "onnxruntime"),
    "windows-arm64": (("win32", "Windows", "ARM64"), "onnxruntime"),
}


def _pyproject() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def _conda_pip() -> list[str]:
    dependencies = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
    return next(d["pip"] for d in dependencies if isinstance(d, dict) and "pip" in d)


def installed_ort_wheels(requirements: list[str], platform: tuple[str, str, str]) -> list[str]:
    """The onnxruntime wheels that ``requirements`` install on ``platform`` (markers evaluated by packaging)."""
    sys_platform, system, machine = platform
    env = {"sys_platform": sys_platform, "platform_system": system, "platform_machine": machine,
           "python_version": "3.11", "python_full_version": "3.11.7", "os_name": "nt" if system == "Windows" else "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    chosen = []
    for line in requirements:
        req = Requirement(line)
        if req.name in ORT_WHEELS and (req.marker is None or req.marker.evaluate(env)):
            chosen.append(req.name)
    return chosen


@pytest.mark.parametrize("source", [_pyproject, _conda_pip, pinned_requirements], ids=["pyproject", "conda.yaml", "model-requirements"])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_exactly_the_wheel_that_exists_is_installed(source, platform):
    environment, expected = PLATFORMS[platform]
    assert installed_ort_wheels(source(), environment) == [expected]


def test_every_source_pins_both_wheels_with_markers():
    for requirements in (_pyproject(), _conda_pip(), pinned_requirements()):
        ort = [Requirement(line) for line in requirements if Requirement(line).name in ORT_WHEELS]
        assert sorted(r.name for r in ort) == sorted(ORT_WHEELS) and all(r.marker is not None for r in ort)


def test_requires_python_is_what_the_tests_need():
    """The tests read TOML with ``tomllib`` (3.11+), and conda.yaml's Python must be one pyproject allows."""
    from packaging.specifiers import SpecifierSet

    allowed = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.10" not in allowed and "3.11" in allowed
    conda_python = next(d for d in yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"]
                        if isinstance(d, str) and d.startswith("python="))
    assert conda_python.split("=", 1)[1] in allowed


def test_the_pinned_environment_of_conda_yaml_is_within_every_floor_of_pyproject():
    """A floor raised above conda.yaml's pins would make `mlflow run` build an environment pyproject refuses."""
    pins = {Requirement(line).name: Requirement(line) for line in _conda_pip()}
    for line in _pyproject():
        floor = Requirement(line)
        pinned = next(iter(pins[floor.name].specifier)).version
        assert floor.specifier.contains(pinned, prereleases=True), f"conda.yaml pins {floor.name}=={pinned}; pyproject wants {floor}"
