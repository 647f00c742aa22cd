"""The one exception type for bad input.

Anything the user can fix (a missing folder, an unknown weights name, a checkpoint
that does not fit the data) raises `UserError` with a message that names the
problem and the fix. `cli.main` prints that message without a traceback and exits
with status 2.
"""

from __future__ import annotations

# The program, as messages and --help name it.
PROG = "python -m tl_project"


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


def class_mismatch(checkpoint: list[str], data: list[str], where: str = "") -> UserError:
    """The error for a checkpoint whose classes are not the data's: both lists, and the two ways on."""
    return UserError(
        f"The checkpoint's classes do not match the data{where}.\n"
        f"  checkpoint ({len(checkpoint)}): {checkpoint}\n"
        f"  data       ({len(data)}): {data}\n"
        "Pass the data the model was trained on (--data.root, --data.dataset), "
        "or fine-tune a new model on this data with fit --model.weights CHECKPOINT."
    )


def user_message(error: BaseException) -> str:
    """The user-facing message of `error`, also when a DataLoader worker re-raised it.

    A worker re-raises its exception as `UserError("Caught UserError in DataLoader
    worker ...\\nOriginal Traceback ...")`; the original message follows the last
    "UserError: " of that text.
    """
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__qualname__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
