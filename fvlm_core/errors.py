"""Errors a user can act on.

Every error raised for bad input says what is wrong, names the file or option involved, and
says what to do. They share one base class so command-line entry points can print them
without a traceback.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


class FVLMError(Exception):
    """Base class: the message is meant for the user (what is wrong and what to do)."""


class InputError(FVLMError, ValueError):
    """An input file or array is unusable (unreadable, wrong dimensionality, not CT, ...)."""


class GeometryError(InputError):
    """Two images cannot be put on one grid (no overlap, invalid spacing or direction)."""


class ConfigError(FVLMError, ValueError):
    """A configuration file or option is invalid."""


class CheckpointError(FVLMError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class DependencyError(FVLMError, ImportError):
    """An optional dependency (or its weights) is not installed; the message says how to get it."""


class DataError(FVLMError):
    """A dataset is malformed (missing columns, files, duplicate names)."""


class CancelledError(FVLMError):
    """Long-running work was cancelled by the user."""


class OutputError(FVLMError, OSError):
    """An output path cannot be written (it is an input, a folder where a file goes, read-only, ...).

    Also an :class:`OSError`, so callers that guard file writes with ``except OSError`` see it.
    """


class FVLMWarning(UserWarning):
    """Something unusual the user should know (the command goes on); the message says what to do.

    The command line prints it as ``fvlm <command>: warning: ...``; commands that write a JSON
    result also record it there (see :func:`recorded_warnings`).
    """


class ReportWarning(UserWarning):
    """A report is empty or not English: its decomposition (or labels) carry no information."""


def warn(message: str) -> None:
    """Issue ``message`` as an :class:`FVLMWarning` (shown every time, not once per place)."""
    warnings.warn(message, FVLMWarning, stacklevel=2)


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the messages of the :class:`FVLMWarning` issued inside the block.

    They are still shown as usual (the command line prints them as they happen); the list lets
    a command record them in its output.
    """
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", FVLMWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, FVLMWarning):
                messages.append(str(message))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield messages


def itk_message(exc: BaseException) -> str:
    """The line of an ITK (SimpleITK) exception worth showing a user: after ``Description:``,
    else its last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "description" in ln.lower():
            return ln.split(":", 1)[-1].strip()
    return lines[-1] if lines else type(exc).__name__
