"""patch_model / unpatch_model: train a Hugging Face causal LM with the fused loss, no logits built.

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
(`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`). Calls without
labels (generation, inference) run the stock forward untouched. `verify=True` checks all of this
against the stock forward at patch time and refuses the model when it differs.

How the patch is applied: the instance's `__class__` is swapped for a subclass of its own class
(created once per class, with the same name and module) whose only additions are `forward`,
`loss_function` and pickling support; `unpatch_model` swaps it back. Nothing process-wide
changes, and compared with binding a forward on the instance (`model.forward = MethodType(...)`)
this keeps:
  - the class-level signature that Trainer and TRL inspect (`find_labels(model.__class__)`, the
    dataset columns kept, `model_accepts_loss_kwargs`): the new forward wraps the stock one
    (`functools.wraps`), so `inspect.signature` reports the stock parameters, `**kwargs` included;
  - instance-level wrappers working on top of it (accelerate's autocast wrapper), `nn.DataParallel`
    replicas (a bound method would stay bound to the original module), `copy.deepcopy`, and
    `pickle` / `torch.save` (a pickled bound method comes back as the stock forward, silently
    unpatching the copy);
  - the class name that `save_pretrained` writes into `config.architectures`.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import functools
import inspect
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loss import fused_linear_dft_loss, make_options, validate_impl
from .parallel import is_dtensor

STATE_ATTR = "_fused_dft_patch"
# On the lm_head: the patch's slot, a list holding the FusedCall of the forward in progress (empty
# between calls), which the lm_head's permanent pre-hook (_capture_pre_hook) reads.
SLOT_ATTR = "_fused_dft_slot"
# Batch figures of the fused pass attached to the output (detached; means over the valid tokens).
# The output also carries `lm_loss`: the fused loss before any router loss (with its gradient; it
# is `loss` for dense models), for trainers that weight the router loss themselves.
STAT_NAMES = ("ce_loss", "entropy", "token_accuracy", "num_tokens")
# Options of patch_model that go to fused_linear_dft_loss unchanged, with their defaults; the
# logit transforms come from the config instead. A new loss option is one entry here.
LOSS_OPTIONS: dict[str, Any] = {
    "chunk_size": None,
    "ignore_index": -100,
    "power_q": None,
    "eaft_alpha": None,
    "clip_eps": None,
    "z_loss": 0.0,
    "label_smoothing": 0.0,
    "validate": None,
}
# The options that define the loss itself (verify checks against the stock cross-entropy without)
FAMILY_OPTIONS = ("power_q", "eaft_alpha", "clip_eps", "z_loss", "label_smoothing")
# Per-token batch columns the patched forward takes as keywords, aligned with `labels` and shifted
# with them (HF Trainer / TRL datasets can carry them): they go to the loss, not to the decoder.
TOKEN_COLUMNS = ("token_weights", "old_logprobs")

_PATCHED_CLASSES: dict[type, type] = {}


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a family does to lm_head's output before its loss, in the stock order.

    z <- z * multiply (Cohere's logit_scale); z <- z / divide (Granite's logits_scaling);
    z <- softcap * tanh(z / softcap) (Gemma 2/3's final_logit_softcapping).
    """

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    @property
    def kernel_scale(self) -> float:
        scale = 1.0 if self.multiply is None else float(self.multiply)
        return scale if self.divide is None else scale / float(self.divide)

    def kernel_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the kernel uses: fp32, logit_scale then softcap (see LossOptions)."""
        z = logits.float() if logits.dtype != torch.float64 else logits
        if self.kernel_scale != 1.0:
            z = z * self.kernel_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


@dataclasses.dataclass(frozen=True)
class PatchState:
    """Per-instance patch settings, stored on the model as `_fused_dft_patch`."""

    base_class: type
    loss_type: str
    impl: str
    loss_options: dict
    eval_logits: bool
    transform: LogitTransform
    is_moe: bool
    positional: tuple[str, ...]
    accepts_kwargs: frozenset[str] | None  # the forward's keyword names; None: it takes **kwargs
    slot: list = dataclasses.field(default_factory=list, compare=False)  # see SLOT_ATTR
    hook_id: int | None = None  # the lm_head pre-hook's key in its _forward_pre_hooks


def patch_model(
    model: nn.Module,
    *,
    loss_type: str = "dft",
    impl: str = "auto",
    verify: bool = True,
    eval_logits: bool = True,
    **loss_options: Any,
) -> nn.Module:
    """Make `model` (a causal LM, or a PEFT model around one) train with the fused loss.

    With labels, the forward returns the fused loss (`loss_type` "dft" or "ce", `impl` as in
    fused_linear_dft_loss) and `logits=None`, plus the detached batch figures `ce_loss`, `entropy`,
    `token_accuracy` and `num_tokens` (see STAT_NAMES). `num_items_in_batch` (passed by HF Trainer
    and TRL) makes the loss sum / num_items_in_batch, as the stock loss does. A MoE family adds
    its router loss exactly as its own forward does.
    In eval mode (`model.training` False) with labels the logits are also returned, built as the
    stock forward builds them, so `compute_metrics` works; `eval_logits=False` keeps eval
    logits-free too. A per-call `skip_logits=True/False` kwarg overrides both.
    loss_options: see LOSS_OPTIONS, as in fused_linear_dft_loss: `chunk_size`, `ignore_index`,
    the loss_type's parameters (`power_q`, `eaft_alpha`, `clip_eps`), `z_loss`,
    `label_smoothing`, `validate`. Per call, the keywords `token_weights` and `old_logprobs`
    (tensors shaped like `labels`, aligned with them) are shifted like the labels and passed to
    the loss; with loss_type="psft" (or `return_token_logprobs=True`) the output also carries
    `token_logprobs`, the detached log-probability of each label, aligned with `labels` (0 where
    nothing is predicted): next step's `old_logprobs`.
    verify: check on a short random input that the logits and the loss the patched path computes
    match the stock forward's, and refuse the model otherwise.

    verify runs the stock forward in this process, so patch before fully_shard /
    parallelize_module (the patch is kept), or pass verify=False for a model already sharded.

    Distributed (docs/distributed.md): under DDP nothing changes. With lm_head an FSDP2 unit
    (fully_shard(model.lm_head), or fully_shard([embed_tokens, lm_head]) when tied) the loss runs
    as a forward of that unit, so FSDP unshards, reshards and reduce-scatters its weight as for
    lm_head(hidden). With a tensor-parallel lm_head (ColwiseParallel: a Shard(0) weight) the loss
    is vocab-parallel: no logits, no gather.

    Patches this instance only (of a PEFT model: its base model) and returns `model`; undo with
    unpatch_model.
    """
    unknown = set(loss_options) - set(LOSS_OPTIONS)
    if unknown:
        raise TypeError(
            f"patch_model got unexpected options {sorted(unknown)}; loss options are "
            f"{list(LOSS_OPTIONS)} (logit_scale and softcap are read from the model's config)"
        )
    options = {**LOSS_OPTIONS, **loss_options}
    make_options(
        loss_type=loss_type,
        **{k: v for k, v in options.items() if k not in ("chunk_size", "validate")},
    )
    validate_impl(impl, options["chunk_size"])
    from .loss import resolve_validate

    resolve_validate(options["validate"], torch.device("cpu"))  # the value, not the device

    target = _causal_lm(model)
    if is_patched(target):
        unpatch_model(target)
    shadowing = target.__dict__.get("forward")
    if shadowing is not None:
        name = getattr(shadowing, "__qualname__", type(shadowing).__name__)
        raise RuntimeError(
            f"patch_model: this {type(target).__name__}'s forward was replaced on the instance "
            f"(by {name}), which would hide the patch. Patch the model before handing it to a "
            "trainer or wrapper (TRL's SFTTrainer and accelerate's autocast set model.forward); "
            "for TRL use fused_dft.integrations.trl.SFTTrainer."
        )
    _lm_head(target)

    base = type(target)
    config = _text_config(target)
    state = PatchState(
        base_class=base,
        loss_type=loss_type,
        impl=impl,
        loss_options=options,
        eval_logits=bool(eval_logits),
        transform=_read_transform(config),
        is_moe=hasattr(config, "output_router_logits"),
        positional=_positional_names(base.forward),
        accepts_kwargs=_keyword_names(base.forward),
    )
    head = _lm_head(target)
    slot = state.slot
    head.__dict__[SLOT_ATTR] = slot
    hook = head.register_forward_pre_hook(_capture_pre_hook)
    state = dataclasses.replace(state, slot=slot, hook_id=hook.id)
    target.__class__ = _patched_class(base)
    setattr(target, STATE_ATTR, state)
    if verify:
        try:
            _verify(target, state)
        except BaseException:
            unpatch_model(target)
            raise
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the stock class (and so the stock forward) of a model patched by patch_model.

    A model that is not patched is returned unchanged.
    """
    target = _causal_lm(model)
    state = target.__dict__.get(STATE_ATTR)
    if state is None:
        return model
    if type(target) is not _PATCHED_CLASSES.get(state.base_class):
        raise RuntimeError(
            f"unpatch_model: the class of this model was changed after patching "
            f"({type(target).__qualname__}); cannot restore {state.base_class.__qualname__}"
        )
    target.__class__ = state.base_class
    delattr(target, STATE_ATTR)
    head = target.get_output_embeddings()
    if head is not None:
        head._forward_pre_hooks.pop(state.hook_id, None)
        head.__dict__.pop(SLOT_ATTR, None)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when patch_model is in effect on `model` (or on the base model of a PEFT model)."""
    return STATE_ATTR in _causal_lm(model, check=False).__dict__


# ---------------------------------------------------------------------------------------------
# The patched forward: the stock forward, its lm_head input recorded and its loss_function fused


class FusedCall:
    """One patched forward call: records lm_head's input and computes the fused loss from it."""

    def __init__(self, model: nn.Module, state: PatchState, keep_logits: bool,
                 columns: dict, want_logprobs: bool) -> None:  # fmt: skip
        self.model = model
        self.state = state
        self.keep_logits = keep_logits
        self.columns = columns  # TOKEN_COLUMNS given to this call, aligned with labels
        self.want_logprobs = want_logprobs
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
        weight = head.weight
        hidden = hidden.to(weight.device)
        shift_labels = shift_labels.to(weight.device)
        columns = {k: v.to(weight.device) for k, v in columns.items()}

        # 2. the fused loss, in the dtype the lm_head would run in: autocast's, else the weight's
        device_type = hidden.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype
        options = {**state.loss_options, "ignore_index": ignore_index}

        def head_loss(hidden_in, labels_in):
            weight, bias = _head_params(self.model, head)  # read after FSDP's unshard
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
                **columns,
                **options,
            )

        with (
            torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext()
        ):
            loss, self.stats, logprobs = _as_lm_head_forward(head, head_loss, hidden, shift_labels)
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
    nothing. Registered once at patch time (compiled graphs trace it; a module-level function so
    copies and pickles of the model keep it)."""
    slot = module.__dict__.get(SLOT_ATTR)
    if not slot:
        return None
    return slot[-1].capture(module, args)


def _fused_forward(model, stock_forward, args: tuple, kwargs: dict):
    state: PatchState | None = model.__dict__.get(STATE_ATTR)
    if args:
        kwargs = _bind_positional(state, stock_forward, args, kwargs)
    if state is None or kwargs.get("labels") is None:
        # no labels (generation, inference), or unpatched while someone still holds this forward
        return stock_forward(model, **kwargs)
    out, _ = _run_fused(model, state, stock_forward, kwargs)
    return out


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

    call = FusedCall(model, state, not skip_logits, columns, want_logprobs)
    if state.slot:
        raise RuntimeError("fused_dft: a patched forward is already running on this model")
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


# ---------------------------------------------------------------------------------------------
# A distributed lm_head: FSDP2 unit, tensor (vocab) parallel

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


def _refuse_sharded_for_verify(model: nn.Module) -> None:
    """verify=True runs the stock forward in this process; sharded parameters (DTensors from
    fully_shard or parallelize_module) cannot run it."""
    for name, param in model.named_parameters():
        if is_dtensor(param):
            raise ValueError(
                f"patch_model(verify=True) compares with the stock forward, which cannot run "
                f"here: {name} is a DTensor with placements {tuple(param.placements)} (the model "
                "was sharded by fully_shard or parallelize_module). Patch the model before "
                "sharding it (the patch is kept), or pass verify=False."
            )


# ---------------------------------------------------------------------------------------------
# The per-class subclass


def _patched_class(base: type) -> type:
    cls = _PATCHED_CLASSES.get(base)
    if cls is not None:
        return cls
    stock_forward = base.forward
    stock_loss_function = inspect.getattr_static(base, "loss_function", None)

    @functools.wraps(stock_forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, stock_forward, args, kwargs)

    forward.__signature__ = _with_token_columns(inspect.signature(stock_forward))

    def get_loss_function(self):
        state = self.__dict__.get(STATE_ATTR)
        if state is not None and state.slot:
            return state.slot[-1].loss
        return stock_loss_function.__get__(self, type(self))

    def set_loss_function(self, value):
        stock_loss_function.__set__(self, value)

    def __reduce_ex__(self, protocol):
        # Rebuild as the patched class although it is not importable by name (see _new_patched).
        reduced = super(cls, self).__reduce_ex__(protocol)
        if (
            isinstance(reduced, tuple)
            and reduced[0] is copyreg.__newobj__
            and reduced[1][:1] == (cls,)
        ):
            return (_new_patched, (base,) + tuple(reduced[1][1:])) + tuple(reduced[2:])
        return reduced

    # Same name, qualname and module as the stock class: transformers keys behaviour off them
    # (config.architectures, custom-code and attention-implementation checks, loss lookup).
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": forward,
            "loss_function": property(get_loss_function, set_loss_function),
            "__reduce_ex__": __reduce_ex__,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        },
    )
    _PATCHED_CLASSES[base] = cls
    return cls


def _with_token_columns(signature: inspect.Signature) -> inspect.Signature:
    """The stock signature plus keyword-only TOKEN_COLUMNS (default None), so HF Trainer's
    remove_unused_columns keeps a dataset's token_weights / old_logprobs columns."""
    params = list(signature.parameters.values())
    names = {p.name for p in params}
    tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in TOKEN_COLUMNS
        if name not in names
    ]
    return signature.replace(parameters=head + extra + tail)


def _new_patched(base: type, *args):
    cls = _patched_class(base)
    return cls.__new__(cls, *args)


# ---------------------------------------------------------------------------------------------
# Structure, config and verification


def _causal_lm(model: nn.Module, check: bool = True) -> nn.Module:
    """The module to patch: the model itself, or the base model of a PEFT model."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    if check and not (
        isinstance(model, nn.Module)
        and hasattr(model, "config")
        and callable(getattr(model, "get_output_embeddings", None))
        and isinstance(inspect.getattr_static(type(model), "loss_function", None), property)
    ):
        raise TypeError(
            f"patch_model needs a Hugging Face causal LM (a PreTrainedModel with an lm_head), "
            f"got {type(model).__name__}"
        )
    return model


def _lm_head(model) -> nn.Linear:
    """The output projection; the fused loss computes F.linear(hidden, lm_head.weight, bias)."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(
            f"patch_model: {name} has no lm_head (get_output_embeddings() returns None); it needs "
            "a causal LM with an output projection, such as LlamaForCausalLM"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise TypeError(
            f"patch_model: the lm_head of {name} is a {kind}, which computes more than "
            "F.linear(hidden, weight, bias), so the fused loss cannot reproduce it. A PEFT adapter "
            "(LoRA) or modules_to_save on lm_head, or a quantized head, are not supported: keep "
            "lm_head out of target_modules."
        )
    if not isinstance(head.weight, torch.Tensor) or head.weight.dim() != 2:
        raise TypeError(f"patch_model: the lm_head weight of {name} is not a 2-D tensor")
    return head


def _text_config(model):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    if not callable(get_text_config):
        return config
    try:
        return get_text_config(decoder=True)
    except (TypeError, ValueError):
        return config


# Config numbers a family may apply to its logits after lm_head. verify=True finds which ones the
# family applies, and how (multiply or divide), by matching the stock logits; without it the
# usual reading is used: logit_scale multiplies (Cohere), logits_scaling divides (Granite).
SCALE_NAMES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
SOFTCAP_NAME = "final_logit_softcapping"


def _config_number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"patch_model: config.{name} must be a number, got {value!r}")
    return float(value)


def _read_transform(config) -> LogitTransform:
    return LogitTransform(
        multiply=_config_number(config, "logit_scale"),
        divide=_config_number(config, "logits_scaling"),
        softcap=_config_number(config, SOFTCAP_NAME),
    )


def _candidate_transforms(config) -> list[LogitTransform]:
    """The usual reading first, then each config number alone, multiplying or dividing, with and
    without the softcap, then no transform at all."""
    softcap = _config_number(config, SOFTCAP_NAME)
    numbers = [v for v in (_config_number(config, n) for n in SCALE_NAMES) if v not in (None, 0)]
    candidates = [_read_transform(config)]
    for cap in dict.fromkeys((softcap, None)):
        candidates += [LogitTransform(multiply=v, softcap=cap) for v in numbers]
        candidates += [LogitTransform(divide=v, softcap=cap) for v in numbers]
        candidates.append(LogitTransform(softcap=cap))
    return list(dict.fromkeys(candidates))


def _positional_names(forward) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
    return tuple(p.name for p in params if p.kind in kinds)


def _keyword_names(forward) -> frozenset[str] | None:
    params = list(inspect.signature(forward).parameters.values())[1:]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind != inspect.Parameter.VAR_POSITIONAL)


def _verify(model, state: PatchState) -> None:
    """Refuse the model unless the patched path reproduces the stock logits and loss.

    Also settles which of the config's logit transforms the family applies (the state's
    transform is replaced by the one that matches).
    """
    _refuse_sharded_for_verify(model)
    head = _lm_head(model)
    weight = head.weight
    embeddings = model.get_input_embeddings()
    vocab = min(weight.shape[0], getattr(embeddings, "num_embeddings", weight.shape[0]))
    generator = torch.Generator().manual_seed(0)  # the caller's RNG stream stays untouched
    input_ids = torch.randint(0, vocab, (2, 9), generator=generator).to(weight.device)
    labels = input_ids.clone()
    labels[0, :3] = state.loss_options["ignore_index"]
    inputs = {"input_ids": input_ids, "labels": labels, "return_dict": True}
    if state.accepts_kwargs is None or "use_cache" in state.accepts_kwargs:
        inputs["use_cache"] = False
    name = f"{state.base_class.__qualname__} ({state.base_class.__module__})"
    refused = f"patch_model(verify=True): {name} was left unpatched"

    def patched_ce(transform: LogitTransform):
        ce_options = {**state.loss_options, **{k: LOSS_OPTIONS[k] for k in FAMILY_OPTIONS}}
        ce_state = dataclasses.replace(
            state, loss_type="ce", transform=transform, loss_options=ce_options
        )
        try:
            return _run_fused(
                model, ce_state, state.base_class.forward, {**inputs, "skip_logits": True}
            )
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{refused}: the patched forward fails on it: {exc}") from exc

    with _eval_mode(model), torch.no_grad():
        stock = None
        if state.is_moe:  # with the router loss, where the stock forward can compute it
            try:
                stock = state.base_class.forward(model, **inputs, output_router_logits=True)
                inputs["output_router_logits"] = True
            except Exception:
                stock = None
        if stock is None:
            try:
                stock = state.base_class.forward(model, **inputs)
            except Exception as exc:
                raise ValueError(
                    f"{refused}: its stock forward fails on a short random batch with labels "
                    f"({type(exc).__name__}: {exc}), so the patch cannot be checked"
                ) from exc
        ours, call = patched_ce(state.transform)
        raw = F.linear(call.hidden, weight, head.bias)

        # 1. the logits: which of the config's transforms the family applies after its lm_head
        stock_logits = getattr(stock, "logits", None)
        if not torch.is_tensor(stock_logits) or tuple(stock_logits.shape) != tuple(raw.shape):
            got = tuple(stock_logits.shape) if torch.is_tensor(stock_logits) else None
            raise ValueError(
                f"{refused}: it returns logits of shape {got}, but its lm_head on the hidden "
                f"states it feeds the head gives {tuple(raw.shape)}"
            )
        tol = max(1e-5, 4 * torch.finfo(stock_logits.dtype).eps)
        reference = stock_logits.to(torch.float64 if raw.dtype == torch.float64 else torch.float32)

        def mismatch(transform: LogitTransform) -> torch.Tensor:
            return (transform.kernel_view(raw) - reference).abs() > tol * (1 + reference.abs())

        transform = next(
            (t for t in _candidate_transforms(_text_config(model)) if not mismatch(t).any()), None
        )
        if transform is None:
            where = tuple(int(i) for i in torch.nonzero(mismatch(state.transform))[0])
            raise ValueError(
                f"patch_model(verify=True): the logits the fused loss would use differ from the "
                f"stock forward's for {name}: at index {where} fused_dft has "
                f"{float(state.transform.kernel_view(raw)[where]):.6g}, the model "
                f"{float(reference[where]):.6g} (transforms read from the config: "
                f"{state.transform}). This family applies a logit transform fused_dft does not "
                "know, so training it with the fused loss would be wrong; the model was left "
                "unpatched."
            )
        if transform != state.transform:
            ours, _ = patched_ce(transform)
            setattr(model, STATE_ATTR, dataclasses.replace(state, transform=transform))

    # 2. the loss: the cross-entropy (+ router loss) of the patched forward is the stock one
    stock_loss = getattr(stock, "loss", None)
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
