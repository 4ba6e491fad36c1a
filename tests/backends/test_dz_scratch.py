"""Bytes of the fused backward's dz scratch: DZ_SCRATCH_BYTES on the CPU; on CUDA up to
DZ_SCRATCH_MAX_BYTES within a quarter of the free memory (the CUDA side is faked here: only
mem_get_info is read)."""

from __future__ import annotations

import math

import pytest
import torch

from fused_dft.backends import fused

CUDA = torch.device("cuda")
GIB, MIB = 2**30, 2**20


@pytest.fixture
def free_memory(monkeypatch):
    state = {"free": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))
    return lambda nbytes: state.update(free=nbytes)


def test_cpu_keeps_the_fixed_scratch():
    assert fused.dz_scratch_bytes(torch.device("cpu")) == fused.DZ_SCRATCH_BYTES == 256 * MIB


def test_cuda_grows_to_the_cap_within_a_quarter_of_free_memory(free_memory):
    free_memory(75 * GIB)
    assert fused.dz_scratch_bytes(CUDA) == fused.DZ_SCRATCH_MAX_BYTES == GIB
    free_memory(2 * GIB)
    assert fused.dz_scratch_bytes(CUDA) == 512 * MIB  # a quarter of 2 GiB
    free_memory(100 * MIB)
    assert fused.dz_scratch_bytes(CUDA) == 256 * MIB  # never below the fixed scratch


def test_the_docstring_arithmetic_fewer_dh_passes(free_memory):
    """16384 x 4096 x 128256 bf16: the fp32 dh accumulator (256 MiB) is read and written once per
    vocab chunk: 16 chunks with 256 MiB of scratch, 4 with 1 GiB."""
    n, d, v, elem = 16384, 4096, 128256, 2

    def chunks(scratch: int) -> int:
        return math.ceil(v / (scratch // (n * elem) // 128 * 128))

    free_memory(75 * GIB)
    assert chunks(fused.DZ_SCRATCH_BYTES) == 16 and chunks(fused.dz_scratch_bytes(CUDA)) == 4
    dh_pass = 2 * n * d * 4
    assert 16 * dh_pass == pytest.approx(8.6e9, rel=0.01)
    assert 4 * dh_pass == pytest.approx(2.15e9, rel=0.01)


def test_tests_that_shrink_the_scratch_keep_it_small_on_cuda(free_memory, monkeypatch):
    """tests/helpers.py's fused_small_tiles sets both, so CUDA runs keep several vocab chunks."""
    monkeypatch.setattr(fused, "DZ_SCRATCH_BYTES", 16 * 4 * 48)
    monkeypatch.setattr(fused, "DZ_SCRATCH_MAX_BYTES", 16 * 4 * 48)
    free_memory(75 * GIB)
    assert fused.dz_scratch_bytes(CUDA) == 16 * 4 * 48
