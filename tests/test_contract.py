"""docs/contract.md covers every flag: each option string of every ``worker`` command (and of the
sub-subcommands: ``models list``, ``topics create``, ``dlq replay``, ...) is listed under that
command in the "Every flag" section; and every command the parser has is there."""

from __future__ import annotations

import re
from pathlib import Path

from deploy.cli import build_parser
from tests.contract_flags import commands, options

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "contract.md"


def flag_sections() -> dict[str, str]:
    text = CONTRACT.read_text(encoding="utf-8")
    assert "\n## Every flag\n" in text, "docs/contract.md has no 'Every flag' section"
    body = text.split("\n## Every flag\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"^### `([^`]+)`.*$", body, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_flag_of_every_command_is_in_the_contract() -> None:
    parser = build_parser()
    sections = flag_sections()
    missing: list[str] = []
    leaves = list(commands(parser))
    assert len(leaves) >= 14  # start, topics create, status, retrain, ..., series delete
    for name, sub in [("worker", parser), *leaves]:
        if name not in sections:
            missing.append(f"section `{name}`")
            continue
        for action in options(sub):
            for flag in action.option_strings:
                if f"`{flag}`" not in sections[name]:
                    missing.append(f"{name} {flag}")
    assert not missing, "not in docs/contract.md 'Every flag': " + ", ".join(missing)


def test_the_exit_codes_are_explained() -> None:
    text = CONTRACT.read_text(encoding="utf-8")
    for code in ("0", "1", "2", "3"):
        assert re.search(rf"^\| {code} \| \S", text, flags=re.MULTILINE), code
