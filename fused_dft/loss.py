"""Public API: validate the arguments, pick an implementation, call it.

impl="auto" picks, in this order:
  - CUDA tensors and Triton installed: "chunked" with the Triton row kernel (the fastest path);
  - anything else (CPU, MPS, ...): "chunked" on torch ops, even when Triton's interpreter is on.
"fused" (no logits tile ever reaches memory; lowest memory, slower) and "reference" (materializes
the logits; the oracle) are chosen explicitly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .options import IMPLS, LOSS_TYPES, REDUCTIONS, LossOptions, LossStats
from .runtime import can_run_triton, triton_unavailable_reason

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_linear_dft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss_type: str = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    return_stats: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LossStats]:
    """Dynamic Fine-Tuning (or cross-entropy) loss of the LM head, without the full logits.

    Shapes: hidden (..., D); weight (V, D); labels (...) integer, same leading shape as hidden;
    bias (V,) or None.

    For token t: z = logit_scale * (W h_t + b), then z <- softcap * tanh(z / softcap) if set;
    log p_t = z_y - logsumexp(z).  ce: loss_t = -log p_t.  dft: loss_t = -sg(p_t) * log p_t.
    Tokens whose label is ignore_index contribute nothing (and cost no matmul work).

    reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum", or "none"
    (per-token losses shaped like labels, 0 at ignored positions; any upstream gradient).
    The loss is fp32 (float64 for float64 inputs) whatever the input dtype.

    return_stats=True returns (loss, LossStats) with detached ce, entropy, accuracy, num_tokens.
    chunk_size: tokens per chunk for impl="chunked"/"auto" (default: sized from the vocabulary).
    """
    opts = LossOptions(
        loss_type=loss_type,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        return_stats=return_stats,
    )
    validate_options(opts, impl, chunk_size)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    validate_tensors(hidden, weight, labels, bias)
    impl = resolve_impl(impl, hidden)

    lead_shape = labels.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1)
    validate_label_range(labels_1d, weight.shape[0], ignore_index)

    if impl == "reference":
        from .reference import reference_loss

        loss, stat_sums, num_valid = reference_loss(hidden_2d, weight, labels_1d, bias, opts)
    elif impl in ("chunked", "chunked_torch"):
        from .chunked import chunked_loss

        use_triton = (
            impl == "chunked" and can_run_triton(hidden.device) and hidden.dtype in TRITON_DTYPES
        )
        loss, stat_sums, num_valid = chunked_loss(
            hidden_2d, weight, labels_1d, bias, opts, chunk_size, use_triton
        )
    else:
        from .function import fused_loss

        loss, stat_sums, num_valid = fused_loss(hidden_2d, weight, labels_1d, bias, opts)

    if reduction == "none":
        loss = loss.reshape(lead_shape)
    if return_stats:
        return loss, LossStats.from_sums(stat_sums, num_valid)
    return loss


class FusedLinearDFTLoss(nn.Module):
    """Module form of fused_linear_dft_loss; takes the same keyword options.

    forward(hidden, weight, labels, bias=None)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = set(options) - set(_KEYWORDS)
        if unknown:
            raise TypeError(
                f"FusedLinearDFTLoss got unknown options {sorted(unknown)}; expected some of "
                f"{list(_KEYWORDS)}"
            )
        self.options = dict(options)
        opts = LossOptions(**{k: v for k, v in options.items() if k not in ("impl", "chunk_size")})
        validate_options(opts, options.get("impl", "auto"), options.get("chunk_size"))

    def forward(self, hidden, weight, labels, bias=None):
        return fused_linear_dft_loss(hidden, weight, labels, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_KEYWORDS = (
    "loss_type",
    "ignore_index",
    "reduction",
    "logit_scale",
    "softcap",
    "impl",
    "return_stats",
    "chunk_size",
)


def autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, cast the floating inputs to the autocast dtype, as the LM head's
    F.linear would (fp32 master weights with bf16 compute); gradients flow back through the cast."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        return hidden, weight, bias
    device_type = hidden.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)


def validate_options(opts: LossOptions, impl: str, chunk_size: int | None) -> None:
    if opts.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {opts.loss_type!r}")
    if opts.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {opts.reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(opts.ignore_index, bool) or not isinstance(opts.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {opts.ignore_index!r}")
    if not isinstance(opts.logit_scale, (int, float)) or not math.isfinite(opts.logit_scale):
        raise ValueError(f"logit_scale must be a finite number, got {opts.logit_scale!r}")
    if opts.logit_scale == 0:
        raise ValueError("logit_scale must be non-zero (a zero scale makes every logit equal)")
    if opts.softcap is not None and (
        not isinstance(opts.softcap, (int, float))
        or not math.isfinite(opts.softcap)
        or opts.softcap <= 0
    ):
        raise ValueError(f"softcap must be None or a positive finite number, got {opts.softcap!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def validate_tensors(hidden, weight, labels, bias) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.long), got {labels.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        devices.add(bias.device)
    if len(devices) > 1:
        names = f"hidden={hidden.device}, weight={weight.device}, labels={labels.device}" + (
            f", bias={bias.device}" if bias is not None else ""
        )
        raise ValueError(f"all tensors must be on one device, got {names}")


def validate_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index are an error, never an out-of-range read."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels.view(-1)[{first}] = {int(labels[first])}"
        )


def resolve_impl(impl: str, hidden: torch.Tensor) -> str:
    device = hidden.device
    if impl == "fused":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"impl='fused' cannot run here: {reason}")
        if hidden.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"impl='fused' supports float16, bfloat16 and float32, got {hidden.dtype}; "
                "use impl='chunked' or 'reference' for float64"
            )
        return "fused"
    if impl == "auto":
        if device.type == "cuda" and can_run_triton(device):
            return "chunked"
        return "chunked_torch"
    return impl
