"""Device specs and the autocast context, shared by the daemon, `streamkd eval` and `streamkd train-teacher`."""

from __future__ import annotations

import pytest
import torch

from streamkd.learn.device import autocast, resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(ValueError, match="Valid: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused() -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_named_on_a_gpu_machine() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_autocast_runs_in_the_given_dtype_and_fp32_without_one() -> None:
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (a @ b).dtype == torch.float32
