"""Matrix products with an fp32 accumulator, shared by the chunked and fused paths."""

from __future__ import annotations

import torch

# whether torch.addmm(fp32 acc, bf16/fp16 a, b, out_dtype=fp32, out=acc) works here (CUDA only);
# turned off for the process the first time it raises
_mixed_addmm = {"ok": "dtype_out" in torch.ops.aten.addmm.overloads()}


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32 / fp64) += a @ b with acc's precision for the sum, avoiding a temporary of acc's
    size where the backend can (CUDA: one cuBLAS GEMM with an fp32 C for bf16/fp16 a, b)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if acc.is_cuda:
        if _mixed_addmm["ok"]:
            try:
                return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            except (RuntimeError, TypeError):
                _mixed_addmm["ok"] = False
        return acc.add_(a @ b)  # a temporary of acc's shape in the input dtype
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU: upcast copies of a and b
