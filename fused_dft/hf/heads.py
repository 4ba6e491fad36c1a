"""A distributed lm_head under the patch: an FSDP2 unit, or a tensor (vocab) parallel weight.

With lm_head an FSDP2 unit (fully_shard(model.lm_head), or fully_shard([embed_tokens, lm_head])
when tied) the loss runs as a forward of that unit, so FSDP unshards, reshards and
reduce-scatters its weight as for lm_head(hidden). With a tensor-parallel lm_head
(ColwiseParallel: a Shard(0) weight) the loss is vocab-parallel: no logits, no gather. In
training, a stand-in takes such a head's place for the stock forward's own call of it (see
docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from ..parallel import is_dtensor

_FSDP_HEAD_METHOD = "_fused_dft_head_forward"


def _as_lm_head_forward(lm_head: nn.Module, fn, hidden: torch.Tensor, labels: torch.Tensor):
    """fn(hidden, labels) run as a forward of lm_head, which the fused loss never calls.

    When lm_head is an FSDP2 unit (fully_shard(model.lm_head), or one group with the tied
    embedding), FSDP's own hooks run around fn as around lm_head(hidden): its weight is unsharded
    (all-gathered) before, resharded after, unsharded again for backward, and its gradient
    reduce-scattered after backward. Otherwise fn is called as it is.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(lm_head, fsdp.FSDPModule):
        return fn(hidden, labels)
    if _FSDP_HEAD_METHOD not in lm_head.__dict__:
        setattr(lm_head, _FSDP_HEAD_METHOD, _call_fn.__get__(lm_head))
        fsdp.register_fsdp_forward_method(lm_head, _FSDP_HEAD_METHOD)
    return getattr(lm_head, _FSDP_HEAD_METHOD)(fn, hidden, labels)


class _HeadStandIn(nn.Module):
    """Takes a distributed lm_head's place during a patched training forward: records the hidden
    states and returns empty logits, so the stock forward never runs the head; the fused loss then
    runs as an FSDP unit's one forward (_as_lm_head_forward), or vocab-parallel on a TP head."""

    def __init__(self, call, out_features: int) -> None:
        super().__init__()
        self.call, self.out_features = call, out_features

    def forward(self, hidden, *args, **kwargs):
        self.call.capture(self, (hidden,))
        return hidden.new_empty(tuple(hidden.shape[:-2]) + (0, self.out_features))


@contextlib.contextmanager
def _fsdp_head_stand_in(model: nn.Module, call):
    """With a distributed lm_head (an FSDP2 unit, or a tensor-parallel DTensor weight) in
    training (empty logits), swap in _HeadStandIn for the call: the stock call of such a head on
    an empty slice would be a second FSDP unit forward, or a zero-size DTensor op."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    head = call.head
    distributed = is_dtensor(head.weight) or (
        fsdp is not None and isinstance(head, fsdp.FSDPModule)
    )
    name = next((n for n, m in model.named_children() if m is head), None)
    if call.keep_logits or not distributed or name is None:
        yield
        return
    setattr(model, name, _HeadStandIn(call, head.out_features))
    try:
        yield
    finally:
        setattr(model, name, head)


def _call_fn(self, fn, *args):
    return fn(*args)


def _head_params(model: nn.Module, lm_head: nn.Module):
    """lm_head's (weight, bias) for the loss. A DTensor weight sharded Shard(0) by tensor
    parallelism (ColwiseParallel) goes to the vocab-parallel loss; one still sharded by FSDP here
    (the hidden states differ per rank) would be taken for it, so that is refused."""
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    owner = _fsdp_owner(model, weight)
    if owner is not None:
        raise RuntimeError(
            f"fused_dft: lm_head.weight reaches the loss still sharded by the FSDP unit "
            f"{owner!r}, which is not unsharded at this point. Make lm_head an FSDP unit "
            "(fully_shard(model.lm_head)); with tied embeddings put both in one unit "
            "(fully_shard([embed_tokens, lm_head])) or leave them to the root unit."
        )
    return weight, bias


def _fsdp_owner(model: nn.Module, weight) -> str | None:
    """Name of the FSDP2 unit whose sharded parameter `weight` is (None if not such a
    parameter). Reads FSDP's per-unit state, which has no public accessor."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not is_dtensor(weight):
        return None
    for name, module in model.named_modules():
        if not isinstance(module, fsdp.FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.13: one group per state
            groups = [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            if any(p.sharded_param is weight for p in getattr(group, "fsdp_params", ())):
                return name or type(module).__name__
    return None
