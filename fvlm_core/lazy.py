"""A package's public names imported on first use (PEP 562 ``__getattr__``).

Three packages use it, each because one of its light submodules is imported where the others'
dependencies must not load (measured on the 2-core machine; the rest of the library imports as
ordinary Python): :mod:`fvlm_core.model` (``fvlm --help`` reads the training recipes, which use
``fvlm_core.model.config``; the model classes would add torch, 1.0-1.6 s), :mod:`fvlm_core.zeroshot`
(3D Slicer's own process reads results with ``fvlm_core.zeroshot.results``; the analyzer would
add torch, 1.6 s, to it) and :mod:`fvlm_core.store` (``fvlm search --like`` reads a store with
``format`` and ``search``; ``encode`` and ``query`` would add torch, 1.6 s).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``modules`` maps each submodule (its name in
    ``package``, e.g. ``"config"``) to the public names it defines; the submodule is imported when
    one of its names is first used, and the name kept."""
    exports = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
