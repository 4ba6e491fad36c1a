"""The losses `fused-dft bench` compares: each maps (hidden, weight, labels) to a scalar loss.

Every provider computes the same number: the mean over non-ignored tokens of the --loss-type's
per-token loss, e.g.
  dft: -sg(p_t) * log p_t      ce: -log p_t
(power, eaft, psft, asft: fused_dft's definitions at their default parameters; psft with fixed
old_logprobs; asft with the starting model as the reference); with --loss-type logprobs the
objective of logprobs.py over per-token log p_y and entropy (fused_linear_logprobs against the
naive log_softmax + gather + entropy), so their times, memory and errors can be put side by
side. A provider that cannot run says why (`unavailable`: a loss type it lacks, a device, a
missing package), and the bench lists it as skipped with that reason.

One provider is no loss: `bound`, the three matmuls any of them must do at least (6*N*D*V FLOPs,
N the non-ignored tokens) through torch's GEMM (cuBLAS on CUDA), a floor for the time; the bench
divides each provider's time by it ("x bound").
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import logprobs
from .problem import IGNORE_INDEX, Problem, family_inputs

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Triton's interpreter costs ~2 ms per tile iteration: past this N*D*V a run takes minutes
INTERPRETER_MAX_WORK = 5e8


@dataclass(frozen=True)
class Provider:
    key: str  # what --providers takes
    label: str  # what tables and plots show
    unavailable: Callable[[Problem], str | None]
    build: Callable[[Problem], LossFn]
    is_loss: bool = True  # False: no error against the reference is measured
    # a provider that runs on problem.nproc processes and takes its inputs its own way
    distributed: bool = False
    make_inputs: Callable | None = None  # (problem, requires_grad) -> (hidden, weight, labels)
    errors: Callable | None = None  # as measure.errors_on_prefix
    # labels -> the token rows its matmuls multiply (every row unless it drops ignored ones)
    matmul_rows: Callable[[torch.Tensor], int] = lambda labels: labels.numel()


def _vocab_parallel() -> Provider:
    from . import distributed

    return Provider(
        "vocab_parallel",
        "fused_dft vocab-parallel",
        distributed.unavailable,
        distributed.build,
        distributed=True,
        make_inputs=distributed.make_shard_inputs,
        errors=distributed.errors_on_shard,
        matmul_rows=fused_dft_rows,
    )


def dft_mean(token_ce: torch.Tensor, labels: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Mean over valid tokens of ce (ce) or ce * exp(-ce).detach() (dft), from per-token CE."""
    valid = labels != IGNORE_INDEX
    token_ce = torch.where(valid, token_ce, torch.zeros_like(token_ce))
    if loss_type == "dft":
        token_ce = token_ce * torch.exp(-token_ce).detach()
    return token_ce.sum() / valid.sum().clamp(min=1)


# -- naive: what TRL's DFT loss and the official DFT code do ------------------------------------


def _naive(problem: Problem) -> LossFn:
    if problem.loss_type == logprobs.LOSS_TYPE:  # log_softmax + gather + entropy
        return logprobs.naive(problem)
    if problem.loss_type not in ("dft", "ce"):
        # the other members on full logits, as trainers compute them (LLaMA-Factory's flags):
        # fused_dft's plain-torch definition, which materializes the fp32 logits the same way
        return _fused_dft("reference")(problem)

    def loss_fn(hidden, weight, labels):
        logits = hidden @ weight.T  # in the input dtype, like the model's lm_head
        if logits.dtype != torch.float64:
            logits = logits.float()
        ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
        return dft_mean(ce, labels, problem.loss_type)

    return loss_fn


# -- fused_dft -----------------------------------------------------------------------------------

_IMPL_MODULES = {"chunked": "fused_dft.backends.chunked", "fused": "fused_dft.backends.fused"}


def _fused_dft_unavailable(impl: str) -> Callable[[Problem], str | None]:
    def reason(problem: Problem) -> str | None:
        from fused_dft.runtime import interpreter_enabled, triton_unavailable_reason

        module = _IMPL_MODULES.get("chunked" if impl == "auto" else impl)
        if module is not None and importlib.util.find_spec(module) is None:
            return f"{module} is missing from this installation of fused_dft"
        if impl != "fused":
            return None
        device = torch.device(problem.device)
        why = triton_unavailable_reason(device)
        if why is not None:
            return why
        if problem.dtype == "float64":
            return "impl='fused' supports float16, bfloat16 and float32 only"
        work = problem.tokens * problem.hidden * problem.vocab
        if device.type == "cpu" and interpreter_enabled() and work > INTERPRETER_MAX_WORK:
            return (
                f"Triton's interpreter (TRITON_INTERPRET=1) would take many minutes at "
                f"N*D*V = {work:.1e}; run it on a CUDA device or on a smaller shape"
            )
        return None

    return reason


def _fused_dft(impl: str) -> Callable[[Problem], LossFn]:
    def build(problem: Problem) -> LossFn:
        from fused_dft import fused_linear_dft_loss

        if problem.loss_type == logprobs.LOSS_TYPE:
            return logprobs.fused(impl)(problem)

        def loss_fn(hidden, weight, labels):
            return fused_linear_dft_loss(
                hidden,
                weight,
                labels,
                loss_type=problem.loss_type,
                ignore_index=IGNORE_INDEX,
                impl=impl,
                **family_inputs(problem, labels, hidden, weight),
            )

        return loss_fn

    return build


def fused_dft_rows(labels: torch.Tensor) -> int:
    """Rows fused_dft's chunked / fused matmuls multiply at the device's default validate: the
    non-ignored ones where the selection is exact (selection.exact_selection: the CPU default,
    CUDA outside graph capture), else all of them."""
    from fused_dft.arguments import default_validate
    from fused_dft.options import LossOptions
    from fused_dft.selection import exact_selection

    opts = LossOptions(ignore_index=IGNORE_INDEX, validate=default_validate(labels.device))
    if exact_selection(opts, labels.device):
        return int((labels != IGNORE_INDEX).sum())
    return labels.numel()


def _non_ignored(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def resolved_impl(impl: str, problem: Problem) -> str:
    """What fused_dft runs for `impl` on this problem's device and dtype (auto -> chunked...)."""
    from fused_dft.arguments import TRITON_DTYPES, resolve_impl
    from fused_dft.runtime import can_run_triton

    if impl in ("fused", "reference"):
        return impl
    device = torch.device(problem.device)
    # resolve_impl reads only .device and .dtype: no tensor, so no CUDA context in the parent
    like_hidden = SimpleNamespace(device=device, dtype=problem.torch_dtype)
    name = resolve_impl(impl, like_hidden)
    if name == "chunked":
        triton = can_run_triton(device) and problem.torch_dtype in TRITON_DTYPES
        name = "chunked+triton" if triton else "chunked_torch"
    return name


# -- other libraries -----------------------------------------------------------------------------


def _needs_cuda(package: str, pip_name: str, what: str) -> Callable[[Problem], str | None]:
    def reason(problem: Problem) -> str | None:
        if problem.loss_type not in ("dft", "ce"):
            return f"{package} computes cross-entropy and DFT only, not {problem.loss_type!r}"
        if importlib.util.find_spec(package) is None:
            return f"{package} is not importable (pip install {pip_name})"
        if not problem.device.startswith("cuda"):
            return f"{what} needs a CUDA device"
        return None

    return reason


def _liger(problem: Problem) -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX,
        reduction="mean",
        use_token_scaling=problem.loss_type == "dft",
    )
    return lambda hidden, weight, labels: module(weight, hidden, labels)  # weight first


def _torch_unavailable(problem: Problem) -> str | None:
    if problem.loss_type not in ("dft", "ce"):
        return f"torch's linear_cross_entropy has no loss_type {problem.loss_type!r}"
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    return None


def _torch_lce(problem: Problem) -> LossFn:
    # options=LinearCrossEntropyOptions() selects torch's chunked path; None would materialize
    options = (
        torch.nn.LinearCrossEntropyOptions()
        if hasattr(torch.nn, "LinearCrossEntropyOptions")
        else None
    )

    def loss_fn(hidden, weight, labels):
        ce = F.linear_cross_entropy(
            hidden, weight, labels, reduction="none", ignore_index=IGNORE_INDEX, options=options
        )
        return dft_mean(ce.float(), labels, problem.loss_type)

    return loss_fn


def _cce(problem: Problem) -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    def loss_fn(hidden, weight, labels):
        ce = linear_cross_entropy(
            hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        return dft_mean(ce.float(), labels, problem.loss_type)

    return loss_fn


def _always(problem: Problem) -> str | None:
    return None


# -- the 3-GEMM bound ----------------------------------------------------------------------------


class ThreeGemms(torch.autograd.Function):
    """forward: logits = h W^T; backward: dh = g W, dW = g^T h, with g the logits buffer itself
    (shaped like the logits; its values do not change the time). 2*N*D*V FLOPs each. Returns a
    zero scalar: nothing else is computed, so the time is the three GEMMs' alone."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.T
        ctx.save_for_backward(hidden, weight, logits)
        return hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _grad):
        hidden, weight, g = ctx.saved_tensors
        return g @ weight, g.T @ hidden


def _three_gemms(problem: Problem) -> LossFn:
    def loss_fn(hidden, weight, labels):
        # the work any method that skips ignored tokens must do: the non-ignored rows only
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        return ThreeGemms.apply(hidden.index_select(0, rows), weight)

    return loss_fn


PROVIDERS: dict[str, Provider] = {
    p.key: p
    for p in (
        Provider("naive", "naive (TRL / DFT code)", _always, _naive),
        Provider(
            "auto",
            "fused_dft auto",
            _fused_dft_unavailable("auto"),
            _fused_dft("auto"),
            matmul_rows=fused_dft_rows,
        ),
        Provider(
            "chunked",
            "fused_dft chunked",
            _fused_dft_unavailable("chunked"),
            _fused_dft("chunked"),
            matmul_rows=fused_dft_rows,
        ),
        Provider(
            "fused",
            "fused_dft fused",
            _fused_dft_unavailable("fused"),
            _fused_dft("fused"),
            matmul_rows=fused_dft_rows,
        ),
        Provider(
            "reference",
            "fused_dft reference",
            _fused_dft_unavailable("reference"),
            _fused_dft("reference"),
        ),
        Provider(
            "liger",
            "Liger FLCE (token scaling)",
            _needs_cuda("liger_kernel", "liger-kernel", "Liger-Kernel's Triton kernels"),
            _liger,
        ),
        Provider("torch", "torch linear_cross_entropy", _torch_unavailable, _torch_lce),
        _vocab_parallel(),
        Provider(
            "cce",
            "Cut Cross-Entropy",
            _needs_cuda("cut_cross_entropy", "cut-cross-entropy", "Cut Cross-Entropy's kernels"),
            _cce,
        ),
        Provider(
            "bound",
            "3-GEMM bound (6NDV)",
            _always,
            _three_gemms,
            is_loss=False,
            matmul_rows=_non_ignored,
        ),
    )
}


def parse_providers(text: str | None) -> list[str]:
    """'naive,auto' -> ['naive', 'auto']; None or 'all' -> every provider. Unknown keys raise."""
    if text is None or text.strip() == "all":
        return list(PROVIDERS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PROVIDERS]
    if unknown or not keys:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    return keys
