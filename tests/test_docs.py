"""The documentation: a short README whose links resolve, and reference pages generated from the code.

The site itself is checked by ``mkdocs build --strict`` in ``.ci/run`` (every page, link and anchor);
these tests need no mkdocs and check what the build cannot: the README, which lies outside the site,
and that the generators cover the code.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click

from dec_mlflow.cli import main

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_a_front_door_of_at_most_150_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_relative_link_of_the_readme_names_a_file_of_the_repository():
    targets = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    relative = [t.partition("#")[0] for t in targets if "://" not in t and not t.startswith("#")]
    assert relative, "the README links onward"
    missing = [t for t in relative if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_parameter_reference_names_every_option_of_every_entry_point_with_its_default():
    text = _hooks().parameters_reference(main)
    for name, command in main.commands.items():
        assert f"## `{name}`" in text
        for param in command.params:
            if isinstance(param, click.Option):
                row = next(line for line in text.splitlines() if line.startswith(f"| `--{param.name}` |"))
                if param.required:
                    assert "(required)" in row
                elif param.default not in (None, ""):
                    assert f"`{param.default}`" in row, row


def test_layout_lists_every_module_with_its_docstring():
    table = _hooks().module_layout()
    for package in ("dec_mlflow", "serving"):
        for path in (REPO / package).glob("*.py"):
            assert f"| `{package}/{path.name}` |" in table
    assert "| `dec_mlflow/estimator.py` | The scikit-learn compatible DEC estimator" in table


def test_links_of_included_repository_files_point_at_site_pages():
    hooks = _hooks()
    text = "[a](BENCHMARKS.md) [b](../README.md#x) [c](../docs/serving.md#batch-scoring) [d](#local) [e](https://x.org/y.md)"
    assert hooks.rewrite_links(text, "serving/README.md", "serving-reference.md") == (
        "[a](BENCHMARKS.md) [b](../README.md#x) [c](serving.md#batch-scoring) [d](#local) [e](https://x.org/y.md)")
    assert hooks.rewrite_links("[r](REPRODUCING.md)", "BENCHMARKS.md", "benchmarks.md") == "[r](reproducing.md)"
