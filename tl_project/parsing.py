"""Command-line errors in a few lines: what is wrong with which option, and where the options are.

jsonargparse answers a bad option with the command's whole usage (over 100 lines for `fit`),
then a report of every type it tried; the one line that matters (e.g. "required: monitor")
is buried, and the usage of a Lightning command lists only Lightning's four commands. Every
parser of this tool prints instead:

    error: --trainer.max_epochs: expected int or None, got 'abc'
    Every option: python -m tl_project fit --help

and exits with status 2.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

KEY = re.compile(r'^Parser key "([^"]+)":\s*\n')
EXPECTED = re.compile(r"^Expected a <class '([\w.]+)'>$")
PROBLEM = re.compile(r"^Problem with given class_path '([\w.]+)':\s*(.*)$", re.DOTALL)
SINGLE = re.compile(r"^Expected a (?:<class '([\w.]+)'>|(typing\.Literal\[.*\]))\. Got value: (.*)$")
LITERAL = re.compile(r"^typing\.Literal\[(.*)\]$")
UNRECOGNIZED = re.compile(r"(?<![\w-])(--[\w.-]+(?:=\S*)?)")
NOT_ACCEPTED = re.compile(r"does not accept option '([^']+)'")
GIVEN = re.compile(r"^\s*Given value: (.*)$", re.MULTILINE)
# What a user who reached for Lightning's EarlyStopping wants: the tool's, which watches val/acc.
EARLY_STOPPING = (
    "Early stopping is one option here: --early_stopping.patience N stops after N epochs without a "
    "better val/acc (and says so)."
)


def _items(message: str) -> list[str]:
    """The `- ...` items under a jsonargparse "Errors:" heading, each with its continuation lines."""
    items: list[str] = []
    lines = message.split("\n")
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped == "Errors:":
            inside = True
        elif inside and stripped.startswith("- "):
            items.append(stripped[2:])
        elif inside and items and line.startswith("      ") and stripped:
            items[-1] += "\n" + stripped
        elif inside and stripped.startswith("Given value"):
            break
    return items


def plain_error(message: str) -> str:
    """A jsonargparse error message, shortened to what is wrong: `--KEY: ...`. Messages it does
    not recognise are returned as they are."""
    found = KEY.match(message)
    if not found:
        return message.strip()
    key = found.group(1)
    items = _items(message)
    if not items:
        text = " ".join(message[found.end() :].split())
        if single := SINGLE.match(text):
            name, literal, value = single.groups()
            choices = LITERAL.match(literal or "")
            wanted = "one of " + choices.group(1).replace("'", "") if choices else name.rsplit(".", 1)[-1]
            text = f"expected {wanted}, got {value!r}"
        return f"--{key}: {text}"
    problems, expected = [], []
    for item in items:
        if typed := EXPECTED.match(item):
            expected.append(typed.group(1).rsplit(".", 1)[-1].replace("NoneType", "None"))
        elif problem := PROBLEM.match(item):
            problems.append(f"{problem.group(1)}: {' '.join(problem.group(2).split())}")
        else:
            problems.append(" ".join(item.split()))
    if problems:
        text = f"--{key}: {'; '.join(problems)}"
    else:
        given = GIVEN.search(message)
        shown = f", got {given.group(1).strip()!r}" if given and len(given.group(1)) < 80 else ""
        text = f"--{key}: expected {' or '.join(expected)}{shown}"
    if key.endswith("callbacks") and "EarlyStopping" in message:
        text += f"\n{EARLY_STOPPING}"
    return text


def option_strings(parser: Any) -> list[str]:
    """Every option string of `parser` (`--data.root`, ...)."""
    return [option for action in parser._actions for option in action.option_strings]


def unknown_options(message: str) -> list[str]:
    """The options a jsonargparse error says it does not know: flags, or a config's keys."""
    unknown = [f"--{key}" for key in NOT_ACCEPTED.findall(message)]
    if message.startswith("unrecognized arguments:"):
        unknown += [arg.split("=", 1)[0] for arg in UNRECOGNIZED.findall(message)]
    return unknown


def suggestion(unknown: Sequence[str], options: Sequence[str]) -> str:
    """ " Did you mean --X?" for those of the `unknown` options close to one of `options`; "" when none is."""
    close = [match for name in unknown for match in difflib.get_close_matches(name, options, n=1, cutoff=0.8)]
    return f"Did you mean {', '.join(dict.fromkeys(close))}?" if close else ""


class ShortErrors:
    """A parser mixin: errors as `plain_error` says them, with the closest option to a
    misspelt one and where to see every option."""

    # The command whose `--help` lists the options, where the parser's prog does not name it
    # (the parser of a Lightning command is a parser of subcommands), and its options.
    command_prog: str | None = None
    command_options: Callable[[], list[str]] | None = None

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser: Any = self
        if not parser.exit_on_error:  # jsonargparse trying one type of several: it catches this
            ArgumentParser.error(parser, message, ex)
        prog = (self.command_prog or parser.prog).replace(" [options]", "")
        options = self.command_options() if self.command_options is not None else option_strings(parser)
        lines = [f"error: {plain_error(message)}", suggestion(unknown_options(message), options)]
        lines.append(f"Every option: {prog} --help")
        sys.stderr.write("".join(f"{line}\n" for line in lines if line))
        raise SystemExit(2)


class Parser(ShortErrors, ArgumentParser):
    """jsonargparse's parser with short errors: the parser of a command of its own."""


class CLIParser(ShortErrors, LightningArgumentParser):
    """Lightning's parser with short errors: TransferLearningCLI's."""
