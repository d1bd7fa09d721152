"""MkDocs hooks: the pages that are generated from the repository at build time, so they cannot drift.

- ``BENCHMARKS.md``, ``REPRODUCING.md`` and ``serving/README.md`` stay where they are (the bench scripts
  write the first, and its figures in ``bench/figures``; the third ships with the package) and become pages
  of the site, their relative links rewritten to the site's pages (a link that matches no page is left
  alone, so ``mkdocs build --strict`` reports it).
- The parameter reference is generated from the table of the estimator's parameters
  (``dec_mlflow.params.PARAMS``: name, rule, help) and from the click commands of ``dec_mlflow/cli.py``
  (each option's name, type, default and help, as ``dec-mlflow <command> --help`` prints them). It
  replaces the marker ``PARAMETERS_MARKER`` in ``docs/reference/parameters.md``.
- The module table of the layout page is generated from the first paragraph of each module's docstring
  (``LAYOUT_MARKER`` in ``docs/reference/layout.md``), so a new module shows up there by itself.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
# repository file -> its page in the site
INCLUDED = {
    "BENCHMARKS.md": "benchmarks.md",
    "REPRODUCING.md": "reproducing.md",
    "serving/README.md": "serving-reference.md",
}
FIGURES = "bench/figures"  # written by the bench scripts, shown by BENCHMARKS.md
PARAMETERS_MARKER = "<!-- generated: cli parameters -->"
LAYOUT_MARKER = "<!-- generated: module layout -->"
PACKAGES = ("dec_mlflow", "serving")
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def rewrite_links(markdown: str, source: str, page: str) -> str:
    """Relative links of the repository file ``source`` as links of the site page ``page``."""
    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if target.startswith("#") or "://" in target or target.startswith("mailto:"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
        if resolved in INCLUDED:
            resolved = INCLUDED[resolved]
        elif resolved.startswith("docs/"):
            resolved = resolved[len("docs/"):]
        else:
            return match.group(0)
        new = posixpath.relpath(resolved, posixpath.dirname(page) or ".") + (f"#{anchor}" if anchor else "")
        return f"{match.group(1)}{new}{match.group(3)}"
    return _LINK.sub(rewrite, markdown)


def _type(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return "one of " + ", ".join(f"`{c}`" for c in kind.choices)
    return {"integer": "integer", "float": "number", "text": "text", "boolean": "flag"}.get(kind.name, kind.name.replace("|", " or "))


def _default(param: click.Parameter) -> str:
    if param.required:
        return "(required)"
    if param.default in (None, ""):
        return "-"
    return f"`{param.default}`"


def _cell(text: str) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def option_rows(command: click.Command) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of each option of ``command``, in the order of its ``--help``."""
    return [(p.name, _type(p), _default(p), _cell(p.help)) for p in _options(command)]


def _table(rows, extra_header: str = "", extra: dict | None = None) -> str:
    header = "| option | type | default | meaning |" + (f" {extra_header} |" if extra_header else "")
    rule = "|---|---|---|---|" + ("---|" if extra_header else "")
    lines = [header, rule]
    for row in rows:
        name, type_, default, help_ = row
        line = f"| `--{name}` | {type_} | {default} | {help_} |"
        if extra_header:
            line += f" {extra[row]} |"
        lines.append(line)
    return "\n".join(lines)


def _is_estimator_option(option: click.Parameter) -> bool:
    """Whether ``option`` is an estimator parameter's (an option of the same name can mean something else,
    such as ``evaluate``'s ``random_state``, the seed of its plot sample)."""
    from dec_mlflow.params import BY_NAME

    return option.name in BY_NAME and option.help == BY_NAME[option.name].help


def estimator_rows(group: click.Group) -> list[tuple]:
    """(name, type, default, rule, help, entry points) of each estimator parameter, from the table
    ``dec_mlflow.params.PARAMS``; type and default are the entry points' (the stages leave some to the preset)."""
    from dec_mlflow.params import PARAMS

    rows = []
    for p in PARAMS:
        options = {name: o for name, command in group.commands.items() for o in command.params
                   if o.name == p.name and _is_estimator_option(o)}
        option = next(iter(options.values()))
        rows.append((p.name, _type(option), _default(option), _cell(str(p.rule)), _cell(p.help),
                     ", ".join(f"`{n}`" for n in options)))
    return rows


def parameters_reference(group: click.Group) -> str:
    """Markdown: the estimator parameters (from their table), the other options shared by several commands
    once, then each command with its own options."""
    commands = dict(group.commands)
    takers: dict[tuple, list[str]] = {}
    for name, command in commands.items():
        for row in option_rows(command):
            takers.setdefault(row, []).append(name)
    estimator = estimator_rows(group)
    # the estimator parameters' rows, which have their own table
    of_estimator = {row for command in commands.values() for row, o in zip(option_rows(command), _options(command))
                    if _is_estimator_option(o)}
    shared = [row for row, names_ in takers.items() if len(names_) > 1 and row not in of_estimator]
    out = ["## Estimator parameters", "",
           "The keyword arguments of `DEC`, from their table `dec_mlflow.params.PARAMS`: the rule is what the "
           "estimator and the stages check (an error names the parameter, the rule and the value); type and "
           "default are the entry points'.", "",
           "| option | type | default | rule | meaning | entry points |", "|---|---|---|---|---|---|",
           *(f"| `--{n}` | {t} | {d} | {r} | {h} | {e} |" for n, t, d, r, h, e in estimator), "",
           "## Options of several entry points", "",
           "Each option below means the same, with the same default, in every entry point that takes it.", "",
           _table(shared, "entry points", {row: ", ".join(f"`{n}`" for n in takers[row]) for row in shared}), ""]
    for name, command in commands.items():
        own = [row for row in option_rows(command) if len(takers[row]) == 1 and row not in of_estimator]
        summary = _cell((command.help or "").split("\n\n")[0])
        out += [f"## `{name}`", "", summary, ""]
        out += [_table(own), ""] if own else ["No options of its own.", ""]
        common = [row[0] for row in option_rows(command) if len(takers[row]) > 1 and row not in of_estimator]
        if common:
            out += ["Also: " + ", ".join(f"`--{n}`" for n in common) + " ([above](#options-of-several-entry-points)).", ""]
        taken = [row[0] for row in option_rows(command) if row in of_estimator]
        if taken:
            out += ["Estimator parameters: " + ", ".join(f"`--{n}`" for n in taken)
                    + " ([above](#estimator-parameters)).", ""]
    return "\n".join(out)


def module_layout(repo: Path = REPO) -> str:
    """Markdown table: each module of ``PACKAGES`` and the first paragraph of its docstring."""
    lines = ["| module | what it holds |", "|---|---|"]
    for package in PACKAGES:
        for path in sorted((repo / package).glob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            lines.append(f"| `{package}/{path.name}` | {_cell(doc.split(chr(10) * 2)[0])} |")
    return "\n".join(lines)


def on_files(files, config):
    from mkdocs.structure.files import File

    for source, page in INCLUDED.items():
        text = rewrite_links((REPO / source).read_text(encoding="utf-8"), source, page)
        files.append(File.generated(config, page, content=text))
    # the figures BENCHMARKS.md shows, at the same path beside its page (the site's root, as the file is the repo's)
    for figure in sorted((REPO / FIGURES).glob("*.png")):
        files.append(File.generated(config, f"{FIGURES}/{figure.name}", abs_src_path=str(figure)))
    return files


def on_page_markdown(markdown, page, config, files):
    if PARAMETERS_MARKER in markdown:
        from dec_mlflow.cli import main

        markdown = markdown.replace(PARAMETERS_MARKER, parameters_reference(main))
    if LAYOUT_MARKER in markdown:
        markdown = markdown.replace(LAYOUT_MARKER, module_layout())
    return markdown
