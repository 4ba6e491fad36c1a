"""Where Triton kernels can run, decided once per call from the device and the environment.

Triton runs on CUDA, or on the CPU through its interpreter. TRITON_INTERPRET=1 is read by
Triton when a kernel is decorated, i.e. when fused_dft.kernels is first imported, so it must be
set before that import (tests set it in conftest.py).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`; otherwise what would make them run."""
    if not triton_installed():
        return "Triton is not installed (pip install 'fused-dft[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return (
            "tensors are on the CPU and Triton's interpreter is off: move them to a CUDA device, "
            "or set TRITON_INTERPRET=1 before importing fused_dft (slow; meant for tests)"
        )
    return f"Triton kernels do not run on device type {device.type!r}; use a CUDA device"


def can_run_triton(device: torch.device) -> bool:
    return triton_unavailable_reason(device) is None


def interpreted(device: torch.device) -> bool:
    """True when Triton kernels on `device` run in the interpreter (no bf16 arithmetic there)."""
    return device.type == "cpu"
