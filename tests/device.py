"""The device the tests run on: CUDA when a GPU is present (kernels compiled), else the CPU with
Triton's interpreter. Imported by conftest.py before anything imports fused_dft.kernels.

FUSED_DFT_TEST_DEVICE=cpu|cuda overrides the choice; TRITON_INTERPRET=1 (as `make test` sets it)
means the CPU, since interpreted kernels cannot take CUDA tensors.
"""

from __future__ import annotations

import os

import torch

ENV = "FUSED_DFT_TEST_DEVICE"


def test_device() -> torch.device:
    wanted = os.environ.get(ENV, "").strip()
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(f"{ENV}={wanted!r}: choose cpu or cuda")
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{ENV}=cuda but torch {torch.__version__} sees no CUDA device")
        if interpreter:
            raise ValueError(f"{ENV}=cuda needs TRITON_INTERPRET unset or 0 (compiled kernels)")
        return torch.device("cuda")
    if wanted == "cpu" or interpreter or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


test_device.__test__ = False  # not a test, despite the name

DEVICE = test_device()
