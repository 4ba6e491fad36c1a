"""The backends behind the driver, by name (base.py has the interface they share).

    chunked        chunks of tokens, logits from a torch matmul, Triton row kernels (CUDA)
    chunked_torch  the same with the row ops in torch (CPU, MPS, float64)
    fused          Triton kernels: logits never stored, not even a chunk (kernels/fused_*.py)

Adding a backend: one module with its forward and backward, and one entry below.
"""

from __future__ import annotations

from .base import Backend
from .chunked import CHUNKED, CHUNKED_TORCH
from .fused import FUSED

BACKENDS: dict[str, Backend] = {b.name: b for b in (CHUNKED, CHUNKED_TORCH, FUSED)}
