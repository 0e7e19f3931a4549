"""Every option of every ``worker`` command, from the parser itself: what docs/contract.md's
"Every flag" section lists, and what ``tests/test_contract.py`` checks it against.

    python -m tests.contract_flags    # prints the section's body (paste it into docs/contract.md)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from deploy.cli import build_parser


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
    return [
        a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def _default(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "not given (a switch)"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "auto" if action.default is None else ("on" if action.default else "off")
    if action.default is None or action.default == argparse.SUPPRESS:
        return "none" if not action.required else "required"
    if isinstance(action, argparse._AppendAction | argparse._ExtendAction):
        return ", ".join(map(str, action.default)) or "none"
    return f"`{action.default}`"


def section(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown body of docs/contract.md's "Every flag" section."""
    parser = parser or build_parser()
    out: list[str] = ["### `worker` (before the command)\n"]
    out += [f"- `{a.option_strings[0]}`: default {_default(a)}" for a in options(parser)]
    for name, sub in commands(parser):
        out.append(f"\n### `{name}`\n")
        for a in options(sub):
            flags = " / ".join(f"`{s}`" for s in a.option_strings)
            choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
            out.append(f"- {flags}{choices}: default {_default(a)}")
    return "\n".join(out).lstrip("\n") + "\n"


if __name__ == "__main__":
    print(section(), end="")
