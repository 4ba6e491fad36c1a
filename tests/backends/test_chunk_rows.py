"""Tokens per chunk of the chunked path: CPU sizing unchanged; on CUDA a multiple of 128 rows
sized from the free memory with a cap (the CUDA side is faked here: only mem_get_info is read)."""

from __future__ import annotations

import pytest
import torch

from fused_dft.backends import chunked

CUDA = torch.device("cuda")
GIB = 2**30


@pytest.fixture
def free_memory(monkeypatch):
    """Set what torch.cuda.mem_get_info reports as free."""
    state = {"free": 0}
    monkeypatch.delenv("FUSED_DFT_CHUNK_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))

    def set_free(nbytes: int) -> None:
        state["free"] = nbytes

    return set_free


def test_cpu_sizing_is_a_32m_element_logits_buffer(monkeypatch):
    monkeypatch.delenv("FUSED_DFT_CHUNK_SIZE", raising=False)
    assert chunked.default_chunk_rows(128256, torch.device("cpu")) == 32 * 2**20 // 128256
    assert chunked.default_chunk_rows(10**9, torch.device("cpu")) == 16


# V of Llama 3, Qwen 2.5, Gemma 2 and a small one; free memory from plenty down to almost none
@pytest.mark.parametrize("vocab", [128256, 151936, 256000, 32000])
@pytest.mark.parametrize("free_gib", [75, 8, 1, 0.01])
def test_cuda_rows_are_a_multiple_of_128_within_cap_and_free_memory(vocab, free_gib, free_memory):
    free_memory(int(free_gib * GIB))
    rows = chunked.default_chunk_rows(vocab, CUDA)
    assert rows % 128 == 0 and rows >= 128
    if rows > 128:  # the floor of one tile may exceed a tiny budget; nothing else may
        assert rows * vocab <= 1024 * 2**20  # the cap, in logits elements
        assert rows * vocab * 4 * 4 <= free_gib * GIB  # a quarter of free memory, 4 B/element


def test_cuda_rows_follow_the_cap_then_the_free_memory(free_memory):
    free_memory(75 * GIB)
    # 1G elements // V = 8372, to 128: 2 chunks at N = 16384 (2 fp32 dW passes, not 8)
    assert chunked.default_chunk_rows(128256, CUDA) == 8320
    free_memory(12 * GIB)
    assert chunked.default_chunk_rows(128256, CUDA) == 6272  # 12 GiB / 16 B // V, to 128
    free_memory(2 * GIB)
    assert chunked.default_chunk_rows(128256, CUDA) == 1024  # 2 GiB / 16 B // V, to 128
    free_memory(0)
    assert chunked.default_chunk_rows(128256, CUDA) == 128


def test_environment_still_wins_on_cuda(free_memory, monkeypatch):
    free_memory(75 * GIB)
    monkeypatch.setenv("FUSED_DFT_CHUNK_SIZE", "100")
    assert chunked.default_chunk_rows(128256, CUDA) == 100
