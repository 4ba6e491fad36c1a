"""Test setup: the device (tests/device.py), and Triton's mode to match it.

On a machine with a GPU the tests run on CUDA with the kernels compiled; without one, on the CPU
with the kernels in Triton's interpreter. TRITON_INTERPRET must be set before fused_dft.kernels is
imported (Triton reads it when a kernel is decorated), so it is set here, at the top of the first
module pytest imports. On CUDA, fused launches use each bucket's default config
(FUSED_DFT_AUTOTUNE=0) unless a test turns autotuning on: tests check results, not speed.
"""

import os

from .device import DEVICE

if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("FUSED_DFT_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from fused_dft.kernels import common  # noqa: E402

# outputs the kernels must fully write start as NaN, so an unwritten element fails a comparison
common.POISON_OUTPUTS = True


def pytest_report_header(config):
    mode = "compiled kernels" if DEVICE.type == "cuda" else "Triton interpreter"
    return f"fused_dft tests on {DEVICE} ({mode})"


@pytest.fixture
def device() -> torch.device:
    """The device the tests' tensors live on."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
