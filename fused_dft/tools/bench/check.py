"""`fused-dft check`: every impl on a small problem against the float64 reference, here.

The problem is small and ragged on purpose (N=257, D=80, V=1003: no dimension a multiple of a
block size) with ~30% of the labels ignored. Cases: dft, ce, and dft with bias, logit_scale and
softcap. "chunked" also runs with chunk_size=N/4, so several chunks are accumulated. An impl
passes when its loss, dh, dW (and db) errors are within tolerance(): the dtype's floor or 4x
the error of plain torch (impl="reference") in the same dtype, whichever is larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .problem import IGNORE_INDEX, Problem, make_inputs, reference_float64, rel_error, tolerance
from .providers import PROVIDERS

CHECK_SHAPE = {"tokens": 257, "hidden": 80, "vocab": 1003}
CASES = {
    "dft": {"loss_type": "dft"},
    "ce": {"loss_type": "ce"},
    "dft+bias+scale+softcap": {
        "loss_type": "dft",
        "bias": True,
        "logit_scale": 1.5,
        "softcap": 10.0,
    },
}


@dataclass
class CheckResult:
    impl: str
    dtype: str
    case: str
    status: str  # PASS, FAIL, SKIP
    errors: dict
    tolerance: float
    reason: str = ""

    def line(self) -> str:
        where = f"{self.impl:<22} {self.dtype:<9} {self.case:<24}"
        if self.status == "SKIP":
            return f"SKIP  {where} {self.reason}"
        errs = "  ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        extra = f"  ({self.reason})" if self.reason else ""
        return f"{self.status}  {where} {errs}  (tol {self.tolerance:.0e}){extra}"


def run_check(device: str, dtypes: list[str], shape: dict | None = None) -> list[CheckResult]:
    """shape: {"tokens", "hidden", "vocab"}, default CHECK_SHAPE."""
    results = []
    for dtype in dtypes:
        for case, options in CASES.items():
            results += check_case(device, dtype, case, dict(options), shape or CHECK_SHAPE)
    return results


def check_case(device: str, dtype: str, case: str, options: dict, shape: dict) -> list[CheckResult]:
    problem = Problem(**shape, dtype=dtype, device=device, loss_type=options["loss_type"])
    hidden, weight, labels = make_inputs(problem, requires_grad=False)
    bias = None
    if options.pop("bias", False):
        gen = torch.Generator().manual_seed(3)
        bias = torch.randn(problem.vocab, generator=gen).to(device=device, dtype=hidden.dtype)
    ref = reference_float64(hidden, weight, labels, bias=bias, **options)

    # reference first: its error (plain torch in this dtype) sets the others' tolerance
    small = max(1, problem.tokens // 4)
    runs = [("reference", {}), ("auto", {}), ("chunked", {}), ("chunked", {"chunk_size": small})]
    runs.append(("fused", {}))
    errors = {}
    results = []
    for impl, extra in runs:
        name = impl + "".join(f" {k}={v}" for k, v in extra.items())
        reason = PROVIDERS[impl].unavailable(problem)
        if reason is not None:
            results.append(CheckResult(name, dtype, case, "SKIP", {}, math.nan, reason))
            continue
        try:
            errors[name] = run_impl(impl, hidden, weight, labels, bias, ref, options, extra)
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
            results.append(CheckResult(name, dtype, case, "FAIL", {}, math.nan, msg))
            continue
        torch_error = max(errors["reference"].values()) if "reference" in errors else None
        tol = tolerance(dtype, device, torch_error)
        worst = max(errors[name].values())
        status = "PASS" if worst <= tol else "FAIL"
        results.append(CheckResult(name, dtype, case, status, errors[name], tol))
    return results


def run_impl(impl, hidden, weight, labels, bias, ref, options, extra) -> dict:
    from fused_dft import fused_linear_dft_loss

    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss = fused_linear_dft_loss(
        h, w, labels, b, ignore_index=IGNORE_INDEX, impl=impl, **options, **extra
    )
    loss.backward()
    ref_loss, ref_dh, ref_dw, ref_db = ref
    errors = {
        "loss": rel_error(loss, ref_loss),
        "dh": rel_error(h.grad, ref_dh),
        "dW": rel_error(w.grad, ref_dw),
    }
    if b is not None:
        errors["db"] = rel_error(b.grad, ref_db)
    return errors
