"""The patched call: the family's own forward, its lm_head input recorded and its loss fused.

One generic causal-LM forward serves every family, and it is the family's own: the stock forward
runs unchanged, with two hooks on this call only.
  - A forward pre-hook on the lm_head (the module `get_output_embeddings()` returns) records the
    hidden states the stock forward feeds it and hands the head an empty slice of them, so the
    `(batch, seq, vocab)` logits are never built (in eval mode the head runs on all of them, so
    `compute_metrics` gets the stock logits).
  - `loss_function`, which every transformers causal LM calls for its loss, returns the fused
    loss of the recorded hidden states against the labels instead of the cross-entropy of the
    logits.
Everything else is the family's forward: the decoder call and its arguments, the MoE router loss
(the family's own function, coefficient and conditions), the output class and its fields. What a
family does between its lm_head and its loss is read from the config and handed to the kernel
(`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`; see model.py).
Calls without labels (generation, inference) run the stock forward untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..family import member
from ..loss import fused_linear_dft_loss
from .heads import _as_lm_head_forward, _fsdp_head_stand_in, _head_params
from .model import _lm_head, _positional_names
from .ref_model import reference_inputs
from .state import SLOT_ATTR, STAT_NAMES, STATE_ATTR, TOKEN_COLUMNS, PatchState
from .zero import check_offload, gathered_head_loss, is_partitioned, raw_params


class FusedCall:
    """One patched forward call: records lm_head's input and computes the fused loss from it."""

    def __init__(self, model: nn.Module, state: PatchState, keep_logits: bool,
                 columns: dict, want_logprobs: bool, reference=None) -> None:  # fmt: skip
        self.model = model
        self.state = state
        self.keep_logits = keep_logits
        self.columns = columns  # TOKEN_COLUMNS given to this call, aligned with labels
        self.want_logprobs = want_logprobs
        # asft: the reference model's (hidden (..., D_ref), lm_head weight, bias) on this batch
        self.reference = reference
        self.head_calls = 0
        self.loss_called = False
        self.hidden: torch.Tensor | None = None
        self.lm_loss: torch.Tensor | None = None  # the fused loss, before any router loss
        self.stats = None
        self.token_logprobs: torch.Tensor | None = None  # aligned with labels
        self.head = _lm_head(model)  # the real one, also while a stand-in takes its place

    def capture(self, module: nn.Module, args: tuple):
        """lm_head forward pre-hook: record the hidden states; training gets an empty slice."""
        self.head_calls += 1
        self.hidden = args[0]
        if self.keep_logits:
            return None
        return (args[0][..., :0, :],) + tuple(args[1:])

    def loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=None,
             shift_labels=None, **kwargs):  # fmt: skip
        """The loss_function the stock forward calls: fused loss of the recorded hidden states."""
        self.loss_called = True
        state, hidden = self.state, self.hidden
        if hidden is None:
            raise RuntimeError(
                f"fused_dft: {state.base_class.__qualname__} computed its loss before calling its "
                "lm_head; it cannot be patched"
            )
        if self.lm_loss is not None:
            raise RuntimeError(
                f"fused_dft: {state.base_class.__qualname__} calls loss_function more than once "
                "per forward; it cannot be patched"
            )
        if ignore_index is None:
            ignore_index = state.loss_options["ignore_index"]
        # 1. next-token labels: shift, unless the caller passed them shifted (context
        #    parallelism); the per-token columns are shifted with them
        columns = dict(self.columns)
        shifted_here = shift_labels is None
        if shifted_here:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            columns = {k: F.pad(v, (0, 1))[..., 1:] for k, v in columns.items()}
        if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"fused_dft: labels of shape {tuple(shift_labels.shape)} for hidden states of "
                f"shape {tuple(hidden.shape)}: with labels the lm_head must see every position "
                "(logits_to_keep is for generation, without labels)"
            )
        head = self.head
        weight, bias = raw_params(head)  # a ZeRO-3 weight is not gathered by this read
        hidden = hidden.to(weight.device)
        shift_labels = shift_labels.to(weight.device)
        columns = {k: v.to(weight.device) for k, v in columns.items()}

        # 2. the fused loss, in the dtype the lm_head would run in: autocast's, else the weight's
        device_type = hidden.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype
        options = {**state.loss_options, "ignore_index": ignore_index}
        reference = {}
        if self.reference is not None:
            # the reference's rows sit at the policy's positions: the labels' shift covers both
            ref_hidden, ref_weight, ref_bias = (
                None if t is None else t.to(weight.device) for t in self.reference
            )
            reference = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}

        def head_loss(hidden_in, labels_in, weight, bias):
            return fused_linear_dft_loss(
                hidden_in.to(dtype),
                weight.to(dtype),
                labels_in,
                None if bias is None else bias.to(dtype),
                loss_type=state.loss_type,
                reduction="mean" if num_items_in_batch is None else "sum",
                logit_scale=state.transform.kernel_scale,
                softcap=state.transform.softcap,
                impl=state.impl,
                return_stats=True,
                return_logprobs=True,
                **{k: None if t is None else t.to(dtype) for k, t in reference.items()},
                **columns,
                **options,
            )

        with (
            torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext()
        ):
            if is_partitioned(weight):  # DeepSpeed ZeRO-3: gathered by the loss itself
                check_offload(state.base_class.__qualname__, weight)
                loss, self.stats, logprobs = gathered_head_loss(
                    head_loss, hidden, shift_labels, weight, bias
                )
            else:
                loss, self.stats, logprobs = _as_lm_head_forward(
                    head,
                    # read after FSDP's unshard
                    lambda h, y: head_loss(h, y, *_head_params(self.model, head)),
                    hidden,
                    shift_labels,
                )
        if self.want_logprobs:
            # back to the labels' positions: position t + 1 holds log p(labels[t + 1] | <= t)
            self.token_logprobs = F.pad(logprobs, (1, 0))[..., :-1] if shifted_here else logprobs
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        self.lm_loss = loss
        # a copy: families add their router loss in place (`loss += coef * aux_loss`)
        return loss.clone()

    def check(self) -> None:
        name = self.state.base_class.__qualname__
        if self.head_calls != 1 or self.lm_loss is None:
            raise RuntimeError(
                f"fused_dft: {name}'s forward called its lm_head {self.head_calls} time(s) and "
                f"{'did not call' if self.lm_loss is None else 'called'} loss_function; the "
                "patch needs one lm_head call followed by self.loss_function(logits, labels, ...)"
            )


def _capture_pre_hook(module: nn.Module, args: tuple):
    """The lm_head's forward pre-hook while patched: inside a patched forward, the FusedCall
    records the hidden states (and, in training, hands the head an empty slice); otherwise it does
    nothing. Registered at patch time, moved to a replaced lm_head by _follow_lm_head (compiled
    graphs trace it; a module-level function so copies and pickles of the model keep it: those of
    fused_dft 0.1.0 name it fused_dft.transformers._capture_pre_hook, kept there)."""
    slot = module.__dict__.get(SLOT_ATTR)
    if not slot:
        return None
    return slot[-1].capture(module, args)


def _hook_head(head: nn.Module, state: PatchState) -> PatchState:
    """Give `head` the patch's slot and the capture pre-hook; the state naming it and its hook.
    A capture pre-hook the head already carries (a copy of a hooked head) is dropped first."""
    for key, hook in list(head._forward_pre_hooks.items()):
        if hook is _capture_pre_hook:
            del head._forward_pre_hooks[key]
    head.__dict__[SLOT_ATTR] = state.slot
    handle = head.register_forward_pre_hook(_capture_pre_hook)
    return dataclasses.replace(state, head=head, hook_id=handle.id)


def _unhook_head(head: nn.Module | None, state: PatchState) -> None:
    """Take the patch's pre-hook and slot off `head` (a head that does not carry them is left as
    it is: hook ids restart in each process, so an id alone could name another hook)."""
    if head is None:
        return
    if head._forward_pre_hooks.get(state.hook_id) is _capture_pre_hook:
        del head._forward_pre_hooks[state.hook_id]
    if head.__dict__.get(SLOT_ATTR) is state.slot:
        del head.__dict__[SLOT_ATTR]


def _hooked_head(model: nn.Module, state: PatchState) -> nn.Module | None:
    """The module carrying the patch's slot and pre-hook (state.head; for a state pickled by
    fused_dft 0.1.0, the current lm_head if it carries the slot)."""
    if state.head is not None:
        return state.head
    head = model.get_output_embeddings()
    return head if head is not None and head.__dict__.get(SLOT_ATTR) is state.slot else None


def _follow_lm_head(model: nn.Module, state: PatchState) -> PatchState:
    """The patch's state with the slot and the pre-hook on the lm_head that
    get_output_embeddings() returns now. resize_token_embeddings (untied) and
    set_output_embeddings replace the head after patch_model: the hook moves off the old head
    onto the new one, and the model's state, which names the hooked head, is stored again."""
    head = _lm_head(model)
    hooked = _hooked_head(model, state)
    if hooked is head and state.head is head:
        return state
    if hooked is head:  # a 0.1.0 state: name the head it hooked, so a later one can follow
        state = dataclasses.replace(state, head=head)
    else:
        _unhook_head(hooked, state)
        state = _hook_head(head, state)
    setattr(model, STATE_ATTR, state)
    return state


def _fused_forward(model, stock_forward, args: tuple, kwargs: dict):
    state: PatchState | None = model.__dict__.get(STATE_ATTR)
    if args:
        kwargs = _bind_positional(state, stock_forward, args, kwargs)
    if state is None or kwargs.get("labels") is None:
        # no labels (generation, inference), or unpatched while someone still holds this forward
        if state is not None:
            _warn_training_without_labels(model, state)
        return stock_forward(model, **kwargs)
    state = _follow_lm_head(model, state)
    _warn_llamafactory_asft(model, state)
    out, _ = _run_fused(model, state, stock_forward, kwargs)
    return out


# patched models already warned that they were trained without labels (once per model)
_WARNED_NO_LABELS: weakref.WeakSet = weakref.WeakSet()

NO_LABELS_WARNING = (
    "fused_dft: the patched {name} was called in training mode, with gradients, without "
    "labels: the stock forward builds the full logits and the fused loss is not used (no memory "
    "saved, and the loss is whatever the caller computes from the logits). A trainer that takes "
    "the labels out to compute its own loss does this: LLaMA-Factory's use_dft_loss / "
    "use_eaft_loss, ms-swift's --enable_dft_loss, axolotl with Liger's "
    "token scaling, HF Trainer with compute_loss_func or label_smoothing_factor. Turn that flag "
    "off and give the loss to the patch instead (patch_model(model, loss_type=...), or the "
    "trainer's adapter in fused_dft.integrations); for inference use model.eval() or "
    "torch.no_grad(). Warned once per model."
)


def _warn_training_without_labels(model, state: PatchState) -> None:
    """A patched model trained without labels silently trains on the stock logits: say so once."""
    if not (model.training and torch.is_grad_enabled()) or model in _WARNED_NO_LABELS:
        return
    _WARNED_NO_LABELS.add(model)
    warnings.warn(
        NO_LABELS_WARNING.format(name=state.base_class.__qualname__), UserWarning, stacklevel=4
    )


# LLaMA-Factory's trainer: with use_asft_loss its compute_loss calls the model with the labels and
# hands the output to asft_loss_func, which without logits returns the output's loss: the KL term
# is dropped (the half-applied case of "no silent bypass")
_LLAMAFACTORY_TRAINER = "llamafactory.train.sft.trainer"
_WARNED_HALF_APPLIED: weakref.WeakSet = weakref.WeakSet()

LLAMAFACTORY_ASFT_WARNING = (
    "fused_dft: the patched {name} is trained by LLaMA-Factory with use_asft_loss: its ASFT "
    "reads the logits, which the patch does not build in training, and falls back to the "
    "model's loss, so the KL term to the reference model is dropped (the loss is the patch's "
    "loss_type={loss_type!r} alone). Run `python -m fused_dft.integrations.llamafactory train "
    "config.yaml` instead (the same YAML: ASFT fused, with LLaMA-Factory's reference model), or "
    "patch_model(model, loss_type='asft', ref_model=...). Warned once per model."
)


def _warn_llamafactory_asft(model, state: PatchState) -> None:
    """Warn once when LLaMA-Factory's own ASFT (use_asft_loss) calls this patched model: the
    caller's frames are read only while its trainer module is imported."""
    trainer_module = sys.modules.get(_LLAMAFACTORY_TRAINER)
    if trainer_module is None or model in _WARNED_HALF_APPLIED or not model.training:
        return
    if member(state.loss_type).needs_reference:  # the patch's own ASFT: its loss has the KL
        return
    trainer_cls = getattr(trainer_module, "CustomSeq2SeqTrainer", None)
    code = getattr(getattr(trainer_cls, "compute_loss", None), "__code__", None)
    frame = sys._getframe(1)
    for _ in range(12):  # model.__call__ and its hooks lie between compute_loss and here
        frame = frame.f_back
        if frame is None:
            return
        if frame.f_code is code:
            trainer = frame.f_locals.get("self")
            finetuning = getattr(trainer, "finetuning_args", None)
            if getattr(finetuning, "use_asft_loss", False):
                _WARNED_HALF_APPLIED.add(model)
                warnings.warn(
                    LLAMAFACTORY_ASFT_WARNING.format(
                        name=state.base_class.__qualname__, loss_type=state.loss_type
                    ),
                    UserWarning,
                    stacklevel=4,
                )
            return


def _run_fused(model, state: PatchState, stock_forward, kwargs: dict):
    """The stock forward with the fused loss; returns (output, the FusedCall)."""
    kwargs = dict(kwargs)
    skip_logits = kwargs.pop("skip_logits", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if state.accepts_kwargs is None or "return_dict" in state.accepts_kwargs:
        kwargs["return_dict"] = True
    if skip_logits is None:
        skip_logits = model.training or not state.eval_logits
    columns = {k: kwargs.pop(k) for k in TOKEN_COLUMNS if kwargs.get(k) is not None}
    for k in TOKEN_COLUMNS:
        kwargs.pop(k, None)
    want_logprobs = bool(kwargs.pop("return_token_logprobs", state.loss_type == "psft"))

    if state.slot:
        raise RuntimeError("fused_dft: a patched forward is already running on this model")
    reference = None
    if state.ref_model is not None:  # asft: the reference model on the same inputs, no_grad
        reference = reference_inputs(state.ref_model, kwargs, state.base_class.__qualname__)
    call = FusedCall(model, state, not skip_logits, columns, want_logprobs, reference)
    state.slot.append(call)  # the lm_head's pre-hook and loss_function find it there
    try:
        with _fsdp_head_stand_in(model, call):
            out = stock_forward(model, **kwargs)
    except Exception as exc:
        if call.head_calls and not call.loss_called:
            raise RuntimeError(
                f"fused_dft: {state.base_class.__qualname__} computes its loss from the logits "
                "itself, not through self.loss_function, so the fused loss cannot replace it "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        raise
    finally:
        state.slot.clear()
    call.check()
    if isinstance(out, tuple):
        raise TypeError(
            f"fused_dft: {state.base_class.__qualname__} returned a tuple although "
            "return_dict=True was asked; it cannot be patched"
        )

    if skip_logits:
        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        out = type(out)(**{**fields, "logits": None})
    figures = (call.stats.ce, call.stats.entropy, call.stats.accuracy, call.stats.num_tokens)
    extra = {"lm_loss": call.lm_loss}
    if call.token_logprobs is not None:
        extra["token_logprobs"] = call.token_logprobs
    for name, value in zip(STAT_NAMES + tuple(extra), figures + tuple(extra.values())):
        if out.logits is None:
            # a key as well as an attribute: survives wrappers that rebuild the output dict
            # (accelerate's mixed-precision forward wrapper does)
            out[name] = value
        else:
            # attribute only: Trainer.prediction_step gathers every key but "loss" as predictions
            object.__setattr__(out, name, value)
    if not return_dict:
        # the stock tuple (the non-None fields in order), with the logits slot kept when None
        values = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
        return tuple(v for k, v in values if v is not None or k == "logits"), call
    return out, call


def _bind_positional(state, stock_forward, args: tuple, kwargs: dict) -> dict:
    names = state.positional if state is not None else _positional_names(stock_forward)
    if len(args) > len(names):
        raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
    bound = dict(zip(names, args))
    duplicate = set(bound) & set(kwargs)
    if duplicate:
        raise TypeError(f"forward got multiple values for {sorted(duplicate)}")
    return {**bound, **kwargs}
