"""DeepSpeed ZeRO-3: an lm_head whose weight is partitioned across the ranks.

A model built under `deepspeed.zero.Init` (what HF Trainer and TRL do when the DeepSpeed config
is given, in TrainingArguments / SFTConfig, before the model is built), or one the DeepSpeed engine
has partitioned, holds on each rank a shard of every parameter: `weight.shape` is (0,), the full
shape is `weight.ds_shape`. What the patch does with such a head:
  - patch_model reads the head by its full shape, and verify=True runs the stock and the patched
    forwards with every parameter gathered (`deepspeed.zero.GatheredParameters`);
  - in training the lm_head module is never called (a stand-in takes its place for the stock
    forward's call, heads._fsdp_head_stand_in), so DeepSpeed's own hooks never gather it;
  - the loss gathers the head weight (and bias) itself for its forward and again for its
    backward (_GatheredHeadLoss), and partitions it again right after each: the full weight is
    resident only while the loss runs, never from the first decoder layer on, and nothing relies
    on DeepSpeed gathering a parameter read outside its module's forward (its "external
    parameter" path, skipped under torch.compile). The cost: the loss's forward runs twice (once
    without gradients, once in backward with them), 8 N D V FLOPs instead of 6, as when the head
    is checkpointed; a tied weight is gathered the same way (the embedding's own gathers are
    DeepSpeed's).
ZeRO-1/2 keep whole parameters on every rank: nothing here applies. deepspeed is imported only
when a partitioned parameter is seen (sys.modules), so fused_dft.hf imports without it.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn


def is_partitioned(tensor) -> bool:
    """A ZeRO-3 parameter (its data may be this rank's shard only: shape (0,))."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The parameter's shape as the model defines it (ds_shape for a ZeRO-3 parameter)."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def raw_params(head: nn.Module):
    """(weight, bias) of the lm_head, read without DeepSpeed's getter. During the ZeRO-3
    engine's forward, reading a partitioned parameter as `head.weight` gathers it and registers
    it as an "external parameter" of the module running then (the root model), which keeps it
    gathered from then on; the patch reads the head through here and gathers it itself."""
    params = head.__dict__.get("_parameters")
    if isinstance(params, dict):
        return dict.get(params, "weight"), dict.get(params, "bias")
    return head.weight, getattr(head, "bias", None)


def _deepspeed():
    return sys.modules.get("deepspeed") or __import__("deepspeed")


def _not_available(params) -> list:
    """The ZeRO-3 parameters among `params` that are partitioned now (not gathered by anyone)."""
    status = _deepspeed().runtime.zero.partition_parameters.ZeroParamStatus
    return [p for p in params if is_partitioned(p) and p.ds_status == status.NOT_AVAILABLE]


@contextlib.contextmanager
def gathered(params):
    """Every partitioned ZeRO-3 parameter of `params` gathered (all ranks take part), partitioned
    again on exit; parameters already gathered (by an outer context, or persistent ones) are left
    to their owner."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        yield
        return
    todo = _not_available(params)
    with _deepspeed().zero.GatheredParameters(todo, enabled=bool(todo)):
        yield


def gathered_model(model: nn.Module):
    """verify=True on a partitioned model: every parameter gathered for the check (a no-op
    without ZeRO-3). The whole model is then resident on each rank for the check's two forwards
    of a 2 x 9-token batch; a model that does not fit one device needs verify=False."""
    params = list(model.parameters())
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    return gathered(params)


def check_offload(model_name: str, weight: torch.Tensor) -> None:
    """ZeRO-3 with its parameters offloaded to NVMe is refused, with the setting named."""
    location = getattr(getattr(weight, "ds_tensor", None), "final_location", None)
    if location is not None and "nvme" in str(location).lower():
        raise ValueError(
            f"fused_dft: the lm_head weight of {model_name} is offloaded to NVMe by DeepSpeed "
            "ZeRO-3 (zero_optimization.offload_param.device: nvme), which the fused loss does "
            "not support (it gathers the head weight itself for its forward and backward). Use "
            'offload_param.device "cpu" or "none", or train without patch_model.'
        )


def gathered_head_loss(run, hidden: torch.Tensor, labels: torch.Tensor, weight, bias):
    """run(hidden, labels, weight, bias) -> (loss, stats, logprobs), with a ZeRO-3 lm_head
    weight (and bias) gathered for it in forward and again in backward (see the module doc)."""
    holder: list = []  # run's outputs
    held: list = []  # what backward gathered, until it is partitioned again
    with gathered([weight, bias]):
        if hidden.requires_grad:
            hidden = _PartitionAfterBackward.apply(hidden, held)
        # applied while gathered: autograd records the full shapes, so the full dW reaches the
        # weight's gradient accumulator (DeepSpeed's reduce-scatter hook) as it would from
        # lm_head(hidden)
        loss = _GatheredHeadLoss.apply(run, holder, held, hidden, labels, weight, bias)
    _, stats, logprobs = holder[0]
    return loss, stats, logprobs


def _gather_now(params) -> list:
    """Gather the partitioned ones of `params` (all ranks take part); returns them."""
    todo = _not_available([p for p in params if p is not None])
    if todo:
        todo[0].all_gather(param_list=todo)
    return todo


def _partition(held: list) -> None:
    if held:
        held[0].partition(param_list=list(held))
        held.clear()


class _GatheredHeadLoss(torch.autograd.Function):
    """The fused loss of a ZeRO-3 lm_head. forward: the loss without gradients (the weight
    gathered by the caller); backward: gathers the weight and bias again, recomputes the loss
    with gradients for (hidden, weight, bias) and returns them. Only hidden and labels are saved:
    no full weight outlives the forward.

    The weight stays gathered after backward returns, until _PartitionAfterBackward (the node
    that feeds hidden in) runs: the autograd engine runs the weight's gradient accumulator first
    (it ranks above every other node), and that needs the parameter whole, as DeepSpeed's own
    module hooks keep it. A tied weight is accumulated later, after the embedding's backward,
    for which DeepSpeed gathers it again itself."""

    @staticmethod
    def forward(ctx, run, holder, held, hidden, labels, weight, bias):
        ctx.run, ctx.held = run, held
        ctx.params = (weight, bias)  # the Parameters (their data is partitioned after this)
        ctx.save_for_backward(hidden, labels)
        out = run(hidden, labels, weight, bias)
        holder.append(out)
        return out[0].detach()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, labels = ctx.saved_tensors
        weight, bias = ctx.params
        needs = ctx.needs_input_grad[3], ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        ctx.held.extend(_gather_now([weight, bias]))
        if not needs[0]:
            # no _PartitionAfterBackward in the graph (hidden needs no gradient): partition when
            # this backward pass ends
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: _partition(ctx.held))
        device_type = hidden.device.type
        no_autocast = (  # as in forward: run casts to the dtype the lm_head would run in
            torch.autocast(device_type, enabled=False)
            if device_type in ("cpu", "cuda")
            else contextlib.nullcontext()
        )
        with torch.enable_grad(), no_autocast:
            inputs = [
                None if t is None else t.detach().requires_grad_(need)
                for t, need in zip((hidden, weight, bias), needs)
            ]
            loss = ctx.run(inputs[0], labels, inputs[1], inputs[2])[0]
            wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
            grads = iter(torch.autograd.grad(loss, wanted, grad_loss) if wanted else ())
            dh, dw, db = (
                next(grads) if need and t is not None else None for t, need in zip(inputs, needs)
            )
        return None, None, None, dh, None, dw, db


class _PartitionAfterBackward(torch.autograd.Function):
    """Identity on hidden; its backward partitions again what _GatheredHeadLoss's backward
    gathered (after the weight's gradient was accumulated)."""

    @staticmethod
    def forward(ctx, hidden, held):
        ctx.held = held
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        _partition(ctx.held)
        return grad, None
