"""Every option of every ``worker`` command, from the parser itself: what docs/contract.md's
"Every flag" section lists, and what ``tests/test_contract.py`` checks it against.

    python -m tests.contract_flags    # prints the section's body (paste it into docs/contract.md)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from deploy.cli import build_parser
from stream.config import field_choices


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``("worker start", parser)``, ... for every leaf (sub)subcommand, in registration order."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(("worker", *path)), parser
        return
    for name, sub in subs[0].choices.items():
        yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options users see (not --help, not the hidden ones such as EVENTCAST_FAULT's field)."""
    return [
        a
        for a in parser._actions
        if a.option_strings
        and not isinstance(a, argparse._HelpAction)
        and a.help != argparse.SUPPRESS
    ]


def _field_default(parser: argparse.ArgumentParser, action: argparse.Action) -> object:
    """An option's default: its settings field's (pydantic-settings leaves argparse's empty)."""
    cls = parser.get_default("settings_cls")
    fields = {f.alias or name: f for name, f in cls.model_fields.items()} if cls else {}
    field = fields.get(action.dest)
    if field is None:
        return action.default
    if field.is_required():
        return argparse.SUPPRESS
    return field.get_default(call_default_factory=True)


def _default(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    default = _field_default(parser, action)
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "not given (a switch)"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "auto" if default is None else ("on" if default else "off")
    if default == argparse.SUPPRESS:
        return "required"
    if default is None:
        return "none" if not action.required else "required"
    if isinstance(action, argparse._AppendAction | argparse._ExtendAction):
        return ", ".join(map(str, default)) or "none"  # type: ignore[call-overload]
    return f"`{default}`"


def section(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown body of docs/contract.md's "Every flag" section."""
    parser = parser or build_parser()
    out: list[str] = ["### `worker` (before the command)\n"]
    out += [f"- `{a.option_strings[0]}`: default {_default(parser, a)}" for a in options(parser)]
    for name, sub in commands(parser):
        out.append(f"\n### `{name}`\n")
        for a in options(sub):
            flags = " / ".join(f"`{s}`" for s in a.option_strings)
            cls = sub.get_default("settings_cls")
            allowed = field_choices(cls, a.dest) if cls and a.dest in cls.model_fields else ()
            choices = f" (one of {', '.join(allowed)})" if allowed else ""
            out.append(f"- {flags}{choices}: default {_default(sub, a)}")
    return "\n".join(out).lstrip("\n") + "\n"


if __name__ == "__main__":
    print(section(), end="")
