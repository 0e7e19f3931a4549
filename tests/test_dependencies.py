"""Every third-party package the code imports is declared in pyproject.toml.

Each ``.py`` file under stream/, model/, train/, deploy/ and bench/ is parsed with ``ast``; every
absolute import (top level or inside a function) that is neither the standard library nor one of
the project's own packages is mapped to its distribution (``importlib.metadata``) and must be
named in ``[project].dependencies`` or the ``dev`` extra. A package that is only present because
another one needs it (a transitive dependency) can change or vanish with that other package's
next release, so importing it directly needs its own declaration.

An import guarded by ``except ImportError`` (an optional feature that says what to install) is
not a dependency.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("stream", "model", "train", "deploy", "bench")
OWN = {*SCANNED, "tests"}
OPTIONAL_GUARDS = {"ImportError", "ModuleNotFoundError"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """Distribution names of ``[project].dependencies`` and the ``dev`` extra, normalised."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return {normalise(re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0]) for spec in specs}


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes inside a ``try`` whose handlers catch ImportError."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & OPTIONAL_GUARDS:
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def third_party_imports() -> Iterator[tuple[str, str]]:
    """(top-level module, ``file:line``) for every non-stdlib, non-project absolute import."""
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            optional = _guarded(tree)
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top not in sys.stdlib_module_names and top not in OWN:
                        yield top, f"{path.relative_to(REPO)}:{node.lineno}"


def test_the_scan_sees_the_projects_imports() -> None:
    modules = {top for top, _ in third_party_imports()}
    assert {"torch", "aiokafka", "redis", "fastapi", "numpy"} <= modules
    assert "deepspeed" not in modules  # imported only under `except ImportError`


def test_every_imported_package_is_declared() -> None:
    dists = packages_distributions()
    wanted = declared()
    undeclared: dict[str, list[str]] = {}
    for top, where in third_party_imports():
        names = {normalise(d) for d in dists.get(top, [])}
        if not names & wanted:
            key = f"{top} (distribution: {', '.join(sorted(names)) or 'not installed'})"
            undeclared.setdefault(key, []).append(where)
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in sorted(undeclared.items())
    )
