"""Errors a user can act on.

Every error raised for bad input says what is wrong, names the file or option involved, and
says what to do. They share one base class so command-line entry points can print them
without a traceback.
"""

from __future__ import annotations


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
