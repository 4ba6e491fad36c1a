"""A distributed lm_head under the patch: an FSDP2 unit, or a tensor (vocab) parallel weight.

With lm_head an FSDP2 unit (fully_shard(model.lm_head), or fully_shard([embed_tokens, lm_head])
when tied) the loss runs as a forward of that unit, so FSDP unshards, reshards and
reduce-scatters its weight as for lm_head(hidden). With a tensor-parallel lm_head
(ColwiseParallel: a Shard(0) weight) the loss is vocab-parallel: no logits, no gather. In
training, a stand-in takes such a head's place for the stock forward's own call of it (see
docs/distributed.md). verify=True on such a model compares the stock forward's logits with the
lm_head's output on each rank's vocabulary shard (_comparable_logits).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import is_dtensor, vocab_parallel_layout
from .zero import is_partitioned, raw_params

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
    """With a distributed lm_head (an FSDP2 unit, a tensor-parallel DTensor weight, a ZeRO-3
    partitioned weight) in training (empty logits), swap in _HeadStandIn for the call: the stock
    call of such a head on an empty slice would be a second FSDP unit forward, a zero-size
    DTensor op, or DeepSpeed's gather of the whole weight for nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    head = call.head
    weight = raw_params(head)[0]
    distributed = (
        is_dtensor(weight)
        or is_partitioned(weight)  # ZeRO-3: DeepSpeed's hooks would gather it for nothing
        or (fsdp is not None and isinstance(head, fsdp.FSDPModule))
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


def _is_tensor_parallel(model: nn.Module, head: nn.Module) -> bool:
    """A tensor (vocab) parallel lm_head: a DTensor weight that no FSDP2 unit shards."""
    return is_dtensor(head.weight) and _fsdp_owner(model, head.weight) is None


def _stock_loss_context(model: nn.Module, head: nn.Module):
    """Where verify runs the stock forward: under loss_parallel() with a tensor-parallel head, so
    that its cross-entropy of the vocab-sharded DTensor logits
    (ColwiseParallel(use_local_output=False)) runs vocab-parallel, as torchtitan's recipes do."""
    if not _is_tensor_parallel(model, head):
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _comparable_logits(model: nn.Module, head: nn.Module, hidden: torch.Tensor, stock_logits):
    """For verify (a tiny batch, at patch time): (raw, stock, group), the lm_head's output on
    `hidden` and the stock forward's logits as plain tensors over the same vocabulary rows, and
    the process group whose ranks hold the other rows (None: every row is here).
      - tensor-parallel head (a Shard(0) weight): this rank's vocabulary shard of both; the stock
        logits (a DTensor, the whole of them, or this rank's shard) are cut to it, not gathered;
      - FSDP2-sharded weight (outside its unit's forward): all-gathered here, as FSDP does for
        each call of the lm_head;
      - otherwise as they are."""
    weight, bias = head.weight, head.bias
    if not _is_tensor_parallel(model, head):
        if is_dtensor(weight):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if is_dtensor(bias) else bias
        return F.linear(hidden, weight, bias), stock_logits, None
    layout = vocab_parallel_layout(hidden, weight, bias, torch.empty(0, dtype=torch.long))
    hidden = hidden.to_local() if is_dtensor(hidden) else hidden  # Replicate: the whole
    raw = F.linear(hidden, weight.to_local(), None if bias is None else bias.to_local())
    if is_dtensor(stock_logits):
        from torch.distributed.tensor import Shard

        vocab_dim = [Shard(stock_logits.dim() - 1)]  # torch.chunk order, as the weight's rows
        stock = stock_logits.redistribute(stock_logits.device_mesh, vocab_dim).to_local()
    elif torch.is_tensor(stock_logits) and stock_logits.shape[-1] == layout.vocab:
        stock = stock_logits[..., layout.offset : layout.offset + layout.local_vocab]
    else:  # this rank's shard already (use_local_output=True), or no logits
        stock = stock_logits
    return raw, stock, layout.group


@contextlib.contextmanager
def _fsdp_resharded_after(model: nn.Module):
    """FSDP2 keeps a root unit's parameters unsharded after its forward, for the backward that
    follows in training. verify's forwards have none: reshard every unit after them, so that the
    model leaves patch_model as sharded as it came (an optimizer built next gets the sharded
    parameters)."""
    try:
        yield
    finally:
        fsdp = sys.modules.get("torch.distributed.fsdp")
        if fsdp is not None:
            for module in model.modules():
                if isinstance(module, fsdp.FSDPModule):
                    module.reshard()
