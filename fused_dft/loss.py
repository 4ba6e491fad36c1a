"""Public API: validate the arguments, pick an implementation, call it.

impl="auto" picks, in this order:
  - CUDA tensors and Triton installed: "chunked" with the Triton row kernel (the fastest path);
  - anything else (CPU, MPS, ...): "chunked" on torch ops, even when Triton's interpreter is on.
"fused" (no logits tile ever reaches memory; lowest memory, slower) and "reference" (materializes
the logits; the oracle) are chosen explicitly.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .options import FAMILY_PARAMS, IMPLS, LOSS_TYPES, REDUCTIONS, LossOptions, LossStats
from .parallel import vocab_parallel_layout
from .runtime import can_run_triton, triton_unavailable_reason
from .validate import VALIDATE_MODES, default_validate

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
    token_weights: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    power_q: float | None = None,
    eaft_alpha: float | None = None,
    clip_eps: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    impl: str = "auto",
    return_stats: bool = False,
    return_logprobs: bool = False,
    chunk_size: int | None = None,
    validate: str | None = None,
):
    """The LM head's DFT loss (or another member of the family), without the full logits.

    Shapes: hidden (..., D); weight (V, D); labels (...) integer, same leading shape as hidden;
    bias (V,) or None; token_weights and old_logprobs float, shaped like labels, or None.

    For token t: z = logit_scale * (W h_t + b), then z <- softcap * tanh(z / softcap) if set;
    lse = logsumexp(z), log p = z_y - lse, p = exp(log p), H = lse - sum softmax(z) z.
    loss_type (w is gradient-stopped; every gradient is w * (softmax(z) - onehot(y))):
      "ce"     -log p
      "dft"    -sg(p) log p                                   (Wu et al., arXiv 2508.05629)
      "power"  (1 - p^q) / q, q = power_q > 0 (default 1)     (arXiv 2510.00526)
      "eaft"   -sg((H / log V)^alpha) log p, alpha = eaft_alpha >= 0 (default 1); the full
               entropy over log V, where the paper uses the top-20 entropy over log 20
      "psft"   -min(r, clip(r, 1 - eps, 1 + eps)), r = p / exp(old_logprobs), eps = clip_eps > 0
               (default 0.2); old_logprobs required                (arXiv 2508.17784)
    z_loss >= 0 adds z_loss * lse^2; label_smoothing in [0, 1) (loss_type="ce" only) is exactly
    torch's cross_entropy(label_smoothing=...); token_weights multiply each token's whole loss
    and gradient (0-weight tokens still count in the "mean" denominator). token_weights and
    old_logprobs are constants: no gradient flows to them.
    Tokens whose label is ignore_index contribute nothing (and cost no matmul work).

    reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum", or "none"
    (per-token losses shaped like labels, 0 at ignored positions; any upstream gradient).
    The loss is fp32 (float64 for float64 inputs) whatever the input dtype.

    Returns the loss; with return_stats=True also a LossStats (detached ce, entropy, accuracy,
    lse, num_tokens), with return_logprobs=True also the detached log p_y shaped like labels
    (0 at ignored positions): (loss, stats), (loss, logprobs) or (loss, stats, logprobs).
    chunk_size: tokens per chunk for impl="chunked"/"auto" (default: sized from the vocabulary).
    validate: "sync" (default on the CPU): bad labels and non-finite token_weights/old_logprobs
    raise ValueError before any compute, and ignored tokens are dropped exactly (one host sync
    on CUDA); "device" (default on CUDA): no host sync, a bad label is never read and makes the
    loss NaN; "off": no check (a bad label is never read and counts as absent). See validate.py.

    Vocab-parallel (parallel.py): a weight (and bias) that is a DTensor sharded Shard(0) on a 1-D
    device mesh means the vocabulary is split across the mesh's ranks (uneven shards are fine).
    hidden must then be the same on every rank of the mesh (a plain tensor or a Replicate
    DTensor), labels hold global ids, and every rank makes the same call. Each rank computes its
    shard's logits chunk by chunk and the ranks merge per-token partials (one all-gather per
    chunk), so the loss, stats and log-probs are those of the whole vocabulary, the same on every
    rank (plain tensors). dW / db come back as DTensors placed like weight / bias; dh is summed
    across the ranks in backward, so each rank gets all of it (a Replicate DTensor for a DTensor
    hidden). impl "reference" is not available there. Any other DTensor placement, a 2-D mesh,
    hidden and weight on different meshes or a sharded hidden raise a ValueError before any
    compute. An FSDP-sharded weight is not vocab-parallel: FSDP unshards it before the loss (see
    patch_model, which routes the loss through an FSDP lm_head unit's own unshard).
    """
    opts = make_options(
        loss_type=loss_type,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        return_stats=return_stats,
        return_logprobs=return_logprobs,
        power_q=power_q,
        eaft_alpha=eaft_alpha,
        clip_eps=clip_eps,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
    )
    validate_impl(impl, chunk_size)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    validate_tensors(hidden, weight, labels, bias)
    layout = vocab_parallel_layout(hidden, weight, bias, labels)  # None unless DTensors are given
    validate_token_inputs(opts, labels, token_weights, old_logprobs)
    opts = dataclasses.replace(opts, validate=resolve_validate(validate, hidden.device))
    impl = resolve_impl(impl, hidden)

    lead_shape = labels.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1)
    token_weights = None if token_weights is None else token_weights.reshape(-1)
    old_logprobs = None if old_logprobs is None else old_logprobs.reshape(-1)
    if layout is not None:
        from .parallel import vocab_parallel_loss

        loss, stat_sums, num_valid, logprobs = vocab_parallel_loss(
            hidden_2d, weight, labels_1d, bias, opts, impl, chunk_size, layout,
            token_weights, old_logprobs,
        )  # fmt: skip
    elif impl == "reference":
        from .reference import reference_loss

        loss, stat_sums, num_valid, logprobs = reference_loss(
            hidden_2d, weight, labels_1d, bias, opts, token_weights, old_logprobs
        )
    else:  # chunked (Triton row kernels), chunked_torch, fused: torch custom ops (ops.py)
        from .ops import linear_loss

        loss, stat_sums, num_valid, logprobs = linear_loss(
            hidden_2d, weight, bias, labels_1d, token_weights, old_logprobs, opts, impl,
            chunk_size,
        )  # fmt: skip

    if reduction == "none":
        loss = loss.reshape(lead_shape)
    out = [loss]
    if return_stats:
        out.append(LossStats.from_sums(stat_sums, num_valid))
    if return_logprobs:
        out.append(logprobs.reshape(lead_shape))
    return out[0] if len(out) == 1 else tuple(out)


class FusedLinearDFTLoss(nn.Module):
    """Module form of fused_linear_dft_loss; takes the same keyword options.

    forward(hidden, weight, labels, bias=None, token_weights=None, old_logprobs=None)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"FusedLinearDFTLoss got unknown options {sorted(unknown)}; expected some of "
                f"{list(OPTION_NAMES)}"
            )
        self.options = dict(options)
        make_options(
            **{k: v for k, v in options.items() if k not in ("impl", "chunk_size", "validate")}
        )
        validate_impl(options.get("impl", "auto"), options.get("chunk_size"))
        resolve_validate(options.get("validate"), torch.device("cpu"))

    def forward(self, hidden, weight, labels, bias=None, token_weights=None, old_logprobs=None):
        return fused_linear_dft_loss(
            hidden, weight, labels, bias,
            token_weights=token_weights, old_logprobs=old_logprobs, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# the keyword options of fused_linear_dft_loss that are not tensors
OPTION_NAMES = (
    "loss_type",
    "ignore_index",
    "reduction",
    "logit_scale",
    "softcap",
    "power_q",
    "eaft_alpha",
    "clip_eps",
    "z_loss",
    "label_smoothing",
    "impl",
    "return_stats",
    "return_logprobs",
    "chunk_size",
    "validate",
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


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def make_options(
    *,
    loss_type: str = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_stats: bool = False,
    return_logprobs: bool = False,
    power_q: float | None = None,
    eaft_alpha: float | None = None,
    clip_eps: float | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> LossOptions:
    """Validate the non-tensor options and resolve the loss_type's parameters to LossOptions."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    logit_scale = _finite_number("logit_scale", logit_scale)
    if logit_scale == 0:
        raise ValueError("logit_scale must be non-zero (a zero scale makes every logit equal)")
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not math.isfinite(softcap)
        or softcap <= 0
    ):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    given = {"power_q": power_q, "eaft_alpha": eaft_alpha, "clip_eps": clip_eps}
    own = FAMILY_PARAMS[loss_type]
    for name, value in given.items():
        if value is not None and name not in own:
            users = [t for t, params in FAMILY_PARAMS.items() if name in params]
            raise ValueError(
                f"{name} is a parameter of loss_type {users[0]!r}, not of {loss_type!r}"
                + (f" (whose parameters are {sorted(own)})" if own else " (which has none)")
            )
    params = {name: own[name] if given[name] is None else given[name] for name in own}
    for name, value in params.items():
        params[name] = _finite_number(name, value)
    if params.get("power_q", 1.0) <= 0:
        raise ValueError(f"power_q must be > 0, got {params['power_q']!r}")
    if params.get("eaft_alpha", 0.0) < 0:
        raise ValueError(f"eaft_alpha must be >= 0, got {params['eaft_alpha']!r}")
    if params.get("clip_eps", 1.0) <= 0:
        raise ValueError(f"clip_eps must be > 0, got {params['clip_eps']!r}")
    z_loss = _finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    label_smoothing = _finite_number("label_smoothing", label_smoothing)
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type != "ce":
        raise ValueError(
            f"label_smoothing is only defined for loss_type='ce' (got loss_type={loss_type!r}): "
            "smoothing a reweighted loss has no agreed meaning"
        )
    for name, flag in (("return_stats", return_stats), ("return_logprobs", return_logprobs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    return LossOptions(
        loss_type=loss_type,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=None if softcap is None else float(softcap),
        return_stats=return_stats,
        return_logprobs=return_logprobs,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        **params,
    )


def validate_impl(impl: str, chunk_size: int | None) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")


def validate_token_inputs(opts: LossOptions, labels, token_weights, old_logprobs) -> None:
    """token_weights / old_logprobs: float tensors shaped like labels on labels' device, finite
    (token_weights) and not requiring grad; old_logprobs exactly when loss_type="psft"."""
    if opts.loss_type == "psft" and old_logprobs is None:
        raise ValueError("loss_type='psft' requires old_logprobs (shaped like labels)")
    if opts.loss_type != "psft" and old_logprobs is not None:
        raise ValueError(f"old_logprobs is only used by loss_type='psft', not {opts.loss_type!r}")
    for name, t in (("token_weights", token_weights), ("old_logprobs", old_logprobs)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != tuple(labels.shape):
            raise ValueError(
                f"{name} must be shaped like labels {tuple(labels.shape)}, got {tuple(t.shape)}"
            )
        if t.device != labels.device:
            raise ValueError(f"{name} must be on labels' device {labels.device}, got {t.device}")
        if t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but no gradient flows to it; pass {name}.detach()"
            )


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
        if device.type == "cuda" and can_run_triton(device) and hidden.dtype in TRITON_DTYPES:
            return "chunked"
        return "chunked_torch"
    if impl == "chunked" and not (can_run_triton(device) and hidden.dtype in TRITON_DTYPES):
        return "chunked_torch"  # the same path with the row ops in torch
    return impl


def resolve_validate(validate: str | None, device: torch.device) -> str:
    """validate=None -> the device's default (validate.default_validate)."""
    if validate is None:
        return default_validate(device)
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be None or one of {VALIDATE_MODES}, got {validate!r}")
    return validate
