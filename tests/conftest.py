"""Test setup: Triton kernels run through the interpreter on this CPU-only machine.

TRITON_INTERPRET must be set before fused_dft.kernels is imported (Triton reads it when a kernel is
decorated), so it is set here, at the top of the first module pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fused_dft.kernels import common  # noqa: E402

# outputs the kernels must fully write start as NaN, so an unwritten element fails a comparison
common.POISON_OUTPUTS = True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
