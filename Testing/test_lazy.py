"""The lazily exported names of fvlm_core.model, .store and .zeroshot (``fvlm_core.lazy``)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["fvlm_core.model", "fvlm_core.store", "fvlm_core.zeroshot"])
def test_every_exported_name_is_its_submodules_object_and_listed(package):
    pkg = importlib.import_module(package)
    exported = {name: module for module, names in pkg._EXPORTS.items() for name in names}
    assert sorted(pkg.__all__) == sorted(exported)
    assert set(exported) <= set(dir(pkg))
    for name, module in exported.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(f"{package}.{module}"), name)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nothing_here'"):
        pkg.nothing_here  # noqa: B018
