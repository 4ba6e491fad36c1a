"""verify=True: check the patched path against the stock forward at patch time.

On a short random batch with labels, in eval mode and without gradients, the patched forward (in
cross-entropy mode, without the family's loss options) must reproduce the stock forward: the
logits the fused loss would use (which also settles which of the config's logit transforms the
family applies) and the loss (cross-entropy plus any MoE router loss). A model that differs is
refused and left unpatched. Both forwards run as model(...) calls, so a model sharded by
fully_shard or parallelize_module is checked as it is, on every rank (heads._comparable_logits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
from torch import nn

from ..parallel import is_dtensor
from .call import _run_fused
from .heads import (
    _comparable_logits,
    _fsdp_resharded_after,
    _is_tensor_parallel,
    _stock_loss_context,
)
from .model import LogitTransform, _candidate_transforms, _lm_head, _text_config
from .state import STATE_ATTR, PatchState, plain_ce_options
from .zero import gathered_model


def _verify(model, state: PatchState) -> None:
    """Refuse the model unless the patched path reproduces the stock logits and loss.

    Also settles which of the config's logit transforms the family applies (the state's
    transform is replaced by the one that matches). A sharded model (fully_shard,
    parallelize_module) is checked as it is, on every rank: see _comparable_logits.
    """
    _refuse_meta_for_verify(model, state)
    with gathered_model(model):  # DeepSpeed ZeRO-3: every parameter whole for the check
        _verify_gathered(model, state)


def _verify_gathered(model, state: PatchState) -> None:
    head = _lm_head(model)
    inputs = _random_batch(model, state, head.weight)
    name = f"{state.base_class.__qualname__} ({state.base_class.__module__})"
    refused = f"patch_model(verify=True): {name} was left unpatched"

    with _fsdp_resharded_after(model), _eval_mode(model), torch.no_grad():
        stock = _stock_output(model, state, inputs, refused)
        ours, call = _patched_ce(model, state, state.transform, inputs, refused)
        raw, stock_logits, group = _comparable_logits(
            model, head, call.hidden, getattr(stock, "logits", None)
        )

        # 1. the logits: which of the config's transforms the family applies after its lm_head
        stock_logits = _checked_logits(stock_logits, raw, refused)
        tol = max(1e-5, 4 * torch.finfo(stock_logits.dtype).eps)
        transform = _matching_transform(model, state, raw, stock_logits, tol, name, group)
        if transform != state.transform:
            ours, _ = _patched_ce(model, state, transform, inputs, refused)
            setattr(model, STATE_ATTR, dataclasses.replace(state, transform=transform))

    # 2. the loss: the cross-entropy (+ router loss) of the patched forward is the stock one
    _check_loss(ours, stock, tol, name)


def _module_call(model: nn.Module, forward, inputs: dict):
    """forward(**inputs) called as model(**inputs), so that the model's own forward hooks run
    around it (those of a root FSDP2 unit: its lazy initialisation and the unshard of its
    parameters), as in training."""
    model.forward = forward  # on the instance, for this call only
    try:
        return model(**inputs)
    finally:
        del model.forward


def _random_batch(model, state: PatchState, weight: torch.Tensor) -> dict:
    """A short random batch with labels (a masked prompt in the first row), the forward's inputs."""
    embeddings = model.get_input_embeddings()
    vocab = min(weight.shape[0], getattr(embeddings, "num_embeddings", weight.shape[0]))
    generator = torch.Generator().manual_seed(0)  # the caller's RNG stream stays untouched
    input_ids = torch.randint(0, vocab, (2, 9), generator=generator).to(weight.device)
    labels = input_ids.clone()
    labels[0, :3] = state.loss_options["ignore_index"]
    inputs = {"input_ids": input_ids, "labels": labels, "return_dict": True}
    if state.accepts_kwargs is None or "use_cache" in state.accepts_kwargs:
        inputs["use_cache"] = False
    return inputs


def _stock_output(model, state: PatchState, inputs: dict, refused: str):
    """The stock forward's output on `inputs`: with the router loss for a MoE family, where the
    stock forward can compute it (`inputs` then asks the patched forward for it too)."""
    forward = functools.partial(state.base_class.forward, model)
    head = _lm_head(model)
    with _stock_loss_context(model, head):
        if state.is_moe:
            try:
                stock = _module_call(model, forward, {**inputs, "output_router_logits": True})
                inputs["output_router_logits"] = True
                return stock
            except Exception:
                pass
        try:
            return _module_call(model, forward, inputs)
        except Exception as exc:
            hint = "" if not _is_tensor_parallel(model, head) else (
                ". Its lm_head is tensor-parallel: verify runs the stock forward under "
                "loss_parallel(), which needs the lm_head's logits as a vocab-sharded DTensor "
                "(ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)); with "
                "another plan, patch before parallelize_module or pass verify=False (the "
                "vocab-parallel loss is the same; only this check is skipped)"
            )  # fmt: skip
            raise ValueError(
                f"{refused}: its stock forward fails on a short random batch with labels "
                f"({type(exc).__name__}: {exc}), so the patch cannot be checked{hint}"
            ) from exc


def _patched_ce(model, state: PatchState, transform: LogitTransform, inputs: dict, refused: str):
    """The patched forward in cross-entropy mode with `transform` (without the family's loss
    options): (output, the FusedCall)."""
    ce_options = plain_ce_options(state.loss_options)
    ce_state = dataclasses.replace(
        state, loss_type="ce", transform=transform, loss_options=ce_options, ref_model=None
    )
    calls = []

    def forward(**kwargs):
        out, call = _run_fused(model, ce_state, state.base_class.forward, kwargs)
        calls.append(call)
        return out

    try:
        out = _module_call(model, forward, {**inputs, "skip_logits": True})
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{refused}: the patched forward fails on it: {exc}") from exc
    return out, calls[0]


def _checked_logits(stock_logits, raw: torch.Tensor, refused: str) -> torch.Tensor:
    """The stock output's logits, refused unless shaped like the lm_head's output `raw`."""
    if not torch.is_tensor(stock_logits) or tuple(stock_logits.shape) != tuple(raw.shape):
        got = tuple(stock_logits.shape) if torch.is_tensor(stock_logits) else None
        raise ValueError(
            f"{refused}: it returns logits of shape {got}, but its lm_head on the hidden "
            f"states it feeds the head gives {tuple(raw.shape)}"
        )
    return stock_logits


def _matching_transform(model, state: PatchState, raw: torch.Tensor, stock_logits: torch.Tensor,
                        tol: float, name: str, group) -> LogitTransform:  # fmt: skip
    """The first of the config's candidate transforms under which the kernel's view of the
    lm_head's output `raw` is the stock logits; the model is refused when none is. With a
    vocab-parallel head (`group`), each rank compares its shard and the ranks agree (one
    all-reduce), so that every rank picks the same transform."""
    reference = stock_logits.to(torch.float64 if raw.dtype == torch.float64 else torch.float32)

    def mismatch(transform: LogitTransform) -> torch.Tensor:
        return (transform.kernel_view(raw) - reference).abs() > tol * (1 + reference.abs())

    candidates = _candidate_transforms(_text_config(model))
    bad = torch.stack([mismatch(t).any() for t in candidates]).to(torch.int32)
    if group is not None:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=group)
    transform = next((t for t, b in zip(candidates, bad.tolist()) if not b), None)
    if transform is None:
        found = torch.nonzero(mismatch(state.transform))
        if len(found):
            where = tuple(int(i) for i in found[0])
            shard = "" if group is None else " of this rank's vocabulary shard"
            differ = (
                f"at index {where}{shard} "
                f"fused_dft has {float(state.transform.kernel_view(raw)[where]):.6g}, the model "
                f"{float(reference[where]):.6g}"
            )
        else:
            differ = "on another rank's vocabulary shard"
        raise ValueError(
            f"patch_model(verify=True): the logits the fused loss would use differ from the "
            f"stock forward's for {name}: {differ} (transforms read from the config: "
            f"{state.transform}). This family applies a logit transform fused_dft does not "
            "know, so training it with the fused loss would be wrong; the model was left "
            "unpatched."
        )
    return transform


def _check_loss(ours, stock, tol: float, name: str) -> None:
    """Refuse the model unless the patched forward's cross-entropy is the stock forward's loss."""
    stock_loss = getattr(stock, "loss", None)
    if is_dtensor(stock_loss):  # under loss_parallel(): a replicated scalar
        stock_loss = stock_loss.full_tensor()
    if stock_loss is None or not math.isclose(
        float(ours.loss), float(stock_loss), rel_tol=tol, abs_tol=tol
    ):
        raise ValueError(
            f"patch_model(verify=True): the cross-entropy the patched forward computes "
            f"({float(ours.loss):.6g}) differs from the stock forward's loss "
            f"({None if stock_loss is None else float(stock_loss)}) for {name}; its loss is not "
            "the causal-LM cross-entropy (+ router loss) fused_dft reproduces, so it was left "
            "unpatched."
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _refuse_meta_for_verify(model: nn.Module, state: PatchState) -> None:
    """verify=True runs the stock forward; weights on the meta device (a model built under
    torch.device("meta"), as transformers' tests and FSDP2 recipes do) cannot run it."""
    tensors = (*model.named_parameters(), *model.named_buffers())
    meta = next((name for name, t in tensors if t.is_meta), None)
    if meta is None:
        return
    raise ValueError(
        f"patch_model(verify=True): {state.base_class.__qualname__} has weights on the meta "
        f"device ({meta} is a meta tensor: not materialized yet), so its stock forward cannot "
        "run to check the patch; the model was left unpatched. Patch it once its weights are "
        "materialized (after model.to_empty(device=...) and their initialization or "
        "load_state_dict, or from_pretrained), or pass verify=False: the patch then computes the "
        "same exact fused loss once the weights are materialized; only the patch-time "
        "comparison with the stock forward is skipped, and with it the check of which of the "
        "config's logit transforms the family applies (the usual reading is used: logit_scale "
        "multiplies, logits_scaling divides, final_logit_softcapping caps). patch_model(model) "
        "again after materializing runs the check."
    )
