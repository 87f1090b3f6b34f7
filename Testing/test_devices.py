"""One device rule for every entry point (fvlm_core.devices.resolve_device), on this CPU-only machine."""

import pytest
import torch

from fvlm_core.devices import resolve_device
from fvlm_core.errors import ConfigError


def test_cpu_auto_and_aliases(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("fvlm_core.devices._mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for absent in ("cuda", "gpu", "cuda:1", "mps"):
        with pytest.raises(ConfigError, match="available"):
            resolve_device(absent)
    with pytest.raises(ConfigError, match="use one of"):
        resolve_device("tpu")


def test_cuda_names_when_a_gpu_is_visible(monkeypatch):
    # stands in for a CUDA machine: only availability is faked; torch.device parsing is real
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("gpu") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)


def test_mps_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("fvlm_core.devices._mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
