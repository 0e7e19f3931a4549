"""JSON Schemas (draft 2020-12) of the objects of docs/contract.md, shipped with the project.

- ``event.schema.json``: an input event (the value of an input record).
- ``forecast.schema.json``: a forecast message (the value of a forecast record).
- ``predict-response.schema.json``: the answer of ``POST /predict`` (a forecast without
  ``source``).

:func:`validator` returns a ``jsonschema`` validator with the cross-file references resolved
locally (nothing is fetched: the ``$id`` host ``eventcast.invalid`` is not resolvable on purpose).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NAMES = ("event", "forecast", "predict-response")


def schema(name: str) -> dict[str, Any]:
    """The parsed schema ``name`` (one of :data:`NAMES`); KeyError for another name."""
    if name not in NAMES:
        raise KeyError(f"unknown schema {name!r}; expected one of {', '.join(NAMES)}")
    return json.loads((HERE / f"{name}.schema.json").read_text(encoding="utf-8"))


@cache
def _registry() -> Any:
    from referencing import Registry, Resource

    return Registry().with_resources(
        (schema(n)["$id"], Resource.from_contents(schema(n))) for n in NAMES
    )


def validator(name: str) -> Any:
    """A ``jsonschema.Draft202012Validator`` for schema ``name`` (formats not asserted)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(name), registry=_registry())
