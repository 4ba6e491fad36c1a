"""Checks of the values of labels and per-token inputs, and when they may read the device.

validate="sync" (the default on the CPU, where reading a value costs nothing): labels outside
    [0, V) other than ignore_index, and non-finite token_weights / old_logprobs at non-ignored
    tokens, raise ValueError naming the first one, before any compute. On CUDA this is one
    device-to-host sync per call (and the exact selection of non-ignored rows is a second).
validate="device" (the default on CUDA): nothing is read on the host. A bad label is never read
    (its logit counts as absent) and that token's loss and gradient are NaN, so the loss comes
    out NaN; non-finite per-token inputs make the loss non-finite the same way.
validate="off": nothing is checked and no host read happens; a bad label is never read either,
    the token is trained as if its label were absent (silently wrong: for inputs known valid).
"""

from __future__ import annotations

import torch

from .options import LossOptions

VALIDATE_MODES = ("sync", "device", "off")


def default_validate(device: torch.device) -> str:
    """ "sync" on the CPU (a host read is free there), "device" on CUDA and other accelerators."""
    return "sync" if device.type == "cpu" else "device"


def validate_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index are an error, never an out-of-range read."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"labels.view(-1)[{first}] = {int(labels.reshape(-1)[first])}"
        )


def validate_token_values(labels, ignore_index, token_weights, old_logprobs) -> None:
    """token_weights / old_logprobs must be finite at the non-ignored tokens (a filler value at an
    ignored position is fine)."""
    for name, t in (("token_weights", token_weights), ("old_logprobs", old_logprobs)):
        if t is None or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t) & (labels != ignore_index)
        if bool(bad.any()):
            first = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(
                f"{name} must be finite at non-ignored tokens; {name}.view(-1)[{first}] = "
                f"{float(t.reshape(-1)[first])}"
            )


def check_values(labels, vocab: int, opts: LossOptions, token_weights, old_logprobs) -> None:
    """Every host-side value check of validate="sync"."""
    validate_label_range(labels, vocab, opts.ignore_index)
    validate_token_values(labels, opts.ignore_index, token_weights, old_logprobs)


@torch.library.custom_op("fused_dft::checked_labels", mutates_args=())
def checked_labels(
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    vocab: int,
    ignore_index: int,
) -> torch.Tensor:
    """check_values as an op (a copy of labels out): a compiled graph keeps the host check of
    validate="sync" and raises its exact message at run time instead of breaking the graph."""
    validate_label_range(labels, vocab, ignore_index)
    validate_token_values(labels, ignore_index, token_weights, old_logprobs)
    return labels.clone()


@checked_labels.register_fake
def _(labels, token_weights, old_logprobs, vocab, ignore_index):
    return torch.empty_like(labels)
