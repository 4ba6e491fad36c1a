"""Every Triton launcher runs its kernel under the tensors' device (kernels.common.launch_device).

Triton launches on torch's current CUDA device; with the LM head on cuda:1 and the current device
cuda:0 (Hugging Face device_map="auto", or no set_device) a launch outside the tensors' device
context reads another GPU's addresses. No GPU here, so the hook is spied on: each launcher must
enter it with its tensors' device, and launch while inside it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fused_dft.kernels import common, configs, fused_bwd, fused_fwd, rows
from fused_dft.options import LossOptions

from ..helpers import SMALL_FUSED


class Spy:
    """launch_device's stand-in: records each device and whether a launch happened inside."""

    def __init__(self):
        self.entered: list[torch.device] = []
        self.depth = 0
        self.launches_outside = 0

    @contextlib.contextmanager
    def launch_device(self, device):
        self.entered.append(device)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def launched(self):
        if self.depth == 0:
            self.launches_outside += 1


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy()
    monkeypatch.setattr(common, "launch_device", spy.launch_device)
    launch = configs.LaunchPlan.launch

    def plan_launch(self, *args, **kwargs):
        spy.launched()
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(configs.LaunchPlan, "launch", plan_launch)
    for name in ("_rows_partials_kernel", "_rows_grad_kernel"):
        kernel = getattr(rows, name)

        class Watched:
            def __getitem__(self, grid, kernel=kernel):
                spy.launched()
                return kernel[grid]

        monkeypatch.setattr(rows, name, Watched())
    return spy


# 37 tokens x 40 features x 129 vocab (ragged), one launch of each launcher
N, D, V = 37, 40, 129


def test_every_launcher_enters_its_tensors_device(spy):
    opts = LossOptions()
    hidden, weight = torch.randn(N, D), torch.randn(V, D)
    labels = torch.randint(0, V, (N,))
    idx, count = torch.arange(N), torch.tensor(N)
    fused_fwd.fused_partials(hidden, weight, None, idx, labels, count, opts, SMALL_FUSED)
    plan = configs.plan(hidden.dtype, hidden.device, D, V, SMALL_FUSED)
    dz = torch.empty(N, 64)
    lse, coefs = torch.zeros(N), torch.zeros(3, N)
    fused_bwd.fused_dz(hidden, weight, None, idx, labels, count, 0, lse, coefs, 0, dz, opts, plan)
    x = torch.randn(N, V)
    rows.rows_partials(x, labels, opts)
    rows.rows_grad_(x, labels, lse, coefs, opts)
    assert spy.entered == [hidden.device] * 4
    assert spy.launches_outside == 0


def test_launch_device_is_the_cuda_device_of_the_tensors():
    """On CUDA the hook is torch.cuda.device of the tensors' device (constructed, not entered:
    there is no GPU here); elsewhere it does nothing."""
    context = common.launch_device(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(common.launch_device(torch.device("cpu")), contextlib.nullcontext)
