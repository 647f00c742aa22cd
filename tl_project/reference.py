"""The command reference of the documentation site, made from the parsers that `--help` prints.

`pages()` runs `COMMAND --help` for every command of `cli.COMMANDS` (in this process, at a
fixed width) and turns each help text into a Markdown page: the command's description,
where it runs, its usage line, and a table of every option with its environment variable,
help, type and default. The site's build (`docs/hooks.py`) calls it, so the reference cannot
drift from the code.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, field

from tl_project.cli import COMMANDS, main
from tl_project.errors import PROG

WIDTH = "100"  # COLUMNS for the help texts: stable wrapping


@dataclass
class Option:
    names: str
    env: str = ""
    help: list[str] = field(default_factory=list)


def help_text(command: str) -> str:
    """What `python -m tl_project COMMAND --help` prints."""
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([command, "--help"])
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue()


def parse(text: str) -> tuple[str, list[tuple[str, list[Option]]]]:
    """(usage, [(group title, options)]) of a jsonargparse help text."""
    usage: list[str] = []
    groups: list[tuple[str, list[Option]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) and lines[i].strip():
        usage.append(lines[i])
        i += 1
    current: list[Option] | None = None
    for line in lines[i:]:
        if not line.strip():
            continue
        if not line.startswith(" ") and line.rstrip().endswith(":"):
            current = []
            groups.append((line.rstrip()[:-1], current))
        elif line.startswith("  ARG:") and current is not None:
            names, _, rest = line[len("  ARG:") :].strip().partition("  ")
            current.append(Option(names.strip(), help=[rest.strip()] if rest.strip() else []))
        elif line.startswith("  ENV:") and current:
            current[-1].env = line[len("  ENV:") :].strip()
        elif current:
            current[-1].help.append(line.strip())
    return "\n".join(usage), [(title, options) for title, options in groups if options]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def page(command: str) -> str:
    """The reference page of `command`."""
    usage, groups = parse(help_text(command))
    described = COMMANDS[command]
    lines = [
        f"# `{command}`",
        "",
        described.description,
        "",
        f"Runs on: {described.runs_on}.",
        "",
        f"Every option below is also read from the environment (the variable beside it); configs and flags "
        f"win. This page is made from the parser that `{PROG} {command} --help` prints.",
        "",
        "```text",
        usage,
        "```",
    ]
    for title, options in groups:
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", "| option | what it does | environment variable |"]
        lines += ["| --- | --- | --- |"]
        for option in options:
            what = re.sub(r"\s+", " ", " ".join(option.help)).strip()
            names = ", ".join(f"`{name.strip()}`" for name in option.names.split(", "))
            lines.append(f"| {names} | {cell(what)} | {f'`{option.env}`' if option.env else ''} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """`reference/COMMAND.md` -> its page, for every command, and `reference/index.md`."""
    index = ["# Command reference", "", "| command | what it does | runs on |", "| --- | --- | --- |"]
    index += [f"| [`{name}`]({name}.md) | {c.description} | {c.runs_on} |" for name, c in COMMANDS.items()]
    result = {"reference/index.md": "\n".join(index) + "\n"}
    result |= {f"reference/{name}.md": page(name) for name in COMMANDS}
    return result
