"""Small @triton.jit helpers shared by the kernel files, and launch-time facts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime import interpreted

# Tests set this so that outputs a kernel should fully write start as NaN: an element the kernel
# forgets to write then fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def tanh(x):
    # libdevice's tanh does not run in the interpreter; tanh(x) = 2 * sigmoid(2x) - 1
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def transform_logits(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = logit_scale * x; z = softcap * tanh(z / softcap). Returns (z, tanh value or 0)."""
    if HAS_SCALE:
        x = x * logit_scale
    th = tl.zeros_like(x)
    if HAS_SOFTCAP:
        th = tanh(x / softcap)
        x = softcap * th
    return x, th


def upcast_for_interpreter(*tensors: torch.Tensor) -> bool:
    """bf16 arithmetic is wrong in Triton's interpreter: there, kernels upcast tiles right after
    loading. On a GPU the flag is off and bf16 tiles go to tl.dot natively."""
    t = tensors[0]
    return interpreted(t.device) and t.dtype == torch.bfloat16


def tf32_allowed() -> bool:
    """Whether torch lets CUDA fp32 matmuls use TF32; never raises.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none" to
    inherit from `torch.backends.fp32_precision`); once it was set, reading the legacy
    `allow_tf32` raises a RuntimeError about mixing the legacy and new APIs. So the new settings
    are read first and the legacy flag last; if even that raises, IEEE (the stricter choice).
    """
    for settings in (torch.backends.cuda.matmul, torch.backends):
        try:
            precision = getattr(settings, "fp32_precision", None)
        except RuntimeError:
            precision = None
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return False
