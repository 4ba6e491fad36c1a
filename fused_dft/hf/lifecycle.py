"""patch_model / unpatch_model / is_patched: the patch's lifecycle on one model instance.

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
What the patched forward does is in call.py; what verify=True checks, in verify.py.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
from typing import Any

from torch import nn

from ..arguments import check_loss_options
from ..family import loss_types, member
from .call import _fused_forward, _hook_head, _hooked_head, _unhook_head
from .heads import _is_tensor_parallel
from .model import (
    _causal_lm,
    _keyword_names,
    _lm_head,
    _positional_names,
    _read_transform,
    _text_config,
)
from .ref_model import check_ref_model
from .state import LOSS_OPTIONS, STATE_ATTR, TOKEN_COLUMNS, PatchState, loss_option_names
from .verify import _verify

_PATCHED_CLASSES: dict[type, type] = {}


def patch_model(
    model: nn.Module,
    *,
    loss_type: str = "dft",
    impl: str = "auto",
    verify: bool = True,
    eval_logits: bool = True,
    ref_model: nn.Module | None = None,
    **loss_options: Any,
) -> nn.Module:
    """Make `model` (a causal LM, or a PEFT model around one) train with the fused loss.

    With labels, the forward returns the fused loss (`loss_type` any member of the family, see
    docs/losses.md; `impl` as in fused_linear_dft_loss) and `logits=None`, plus the detached batch
    figures `ce_loss`, `entropy`, `token_accuracy` and `num_tokens` (see STAT_NAMES).
    `num_items_in_batch` (passed by HF Trainer and TRL) makes the loss sum / num_items_in_batch,
    as the stock loss does. A MoE family adds its router loss exactly as its own forward does.
    In eval mode (`model.training` False) with labels the logits are also returned, built as the
    stock forward builds them, so `compute_metrics` works; `eval_logits=False` keeps eval
    logits-free too. A per-call `skip_logits=True/False` kwarg overrides both.
    loss_options: see LOSS_OPTIONS, as in fused_linear_dft_loss: `chunk_size`, `ignore_index`,
    the loss_type's parameters (family.py: `power_q`, `eaft_alpha`, ...), `z_loss`,
    `label_smoothing`, `validate`. Per call, the keywords `token_weights` and `old_logprobs`
    (tensors shaped like `labels`, aligned with them) are shifted like the labels and passed to
    the loss; with loss_type="psft" (or `return_token_logprobs=True`) the output also carries
    `token_logprobs`, the detached log-probability of each label, aligned with `labels` (0 where
    nothing is predicted): next step's `old_logprobs`.
    ref_model: loss_type="asft"'s reference model (required there, refused with any other
    loss_type): a causal LM over the same vocabulary, frozen and put in eval mode here, held
    beside the model (not a submodule: not in its state_dict, parameters or .to()); each call with
    labels runs its forward under no_grad on the same inputs and feeds its lm_head input and head
    to the loss (ref_model.py). There is no default: a frozen copy of the starting model, as
    LLaMA-Factory builds, is `copy.deepcopy(model)` before training (one more copy of the
    weights).
    verify: check on a short random input that the logits and the loss the patched path computes
    match the stock forward's, and refuse the model otherwise.

    verify works before or after fully_shard / parallelize_module (call patch_model on every
    rank: on a sharded model the check runs collectives); a model on the meta device cannot be
    verified (patch once its weights are materialized, or pass verify=False).

    Distributed (docs/distributed.md): under DDP nothing changes. With lm_head an FSDP2 unit
    (fully_shard(model.lm_head), or fully_shard([embed_tokens, lm_head]) when tied) the loss runs
    as a forward of that unit, so FSDP unshards, reshards and reduce-scatters its weight as for
    lm_head(hidden). With a tensor-parallel lm_head (ColwiseParallel: a Shard(0) weight) the loss
    is vocab-parallel: no logits, no gather.

    Patches this instance only (of a PEFT model: its base model) and returns `model`; undo with
    unpatch_model.
    """
    options = _checked_options(loss_type, impl, loss_options)
    target = _causal_lm(model)
    _check_reference_wanted(loss_type, ref_model)
    if is_patched(target):
        unpatch_model(target)
    _refuse_shadowed_forward(target)
    head = _lm_head(target)
    if ref_model is not None:
        if _is_tensor_parallel(target, head):
            raise ValueError(
                "patch_model: loss_type='asft' is not supported with a tensor-parallel (vocab-"
                "parallel) lm_head; use a whole or FSDP-sharded lm_head"
            )
        ref_model = check_ref_model(target, ref_model)

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
        ref_model=ref_model,
    )
    state = _install(target, state)
    if verify:
        try:
            _verify(target, state)
        except BaseException:
            unpatch_model(target)
            raise
    return model


def _checked_options(loss_type: str, impl: str, loss_options: dict) -> dict:
    """patch_model's loss options over LOSS_OPTIONS' defaults, checked as fused_linear_dft_loss
    would check them, before anything is patched."""
    unknown = set(loss_options) - set(loss_option_names())
    if unknown:
        raise TypeError(
            f"patch_model got unexpected options {sorted(unknown)}; loss options are "
            f"{list(loss_option_names())} (logit_scale and softcap are read from the model's "
            "config)"
        )
    options = {**LOSS_OPTIONS, **loss_options}
    check_loss_options(caller="patch_model", loss_type=loss_type, impl=impl, **options)
    return options


def _check_reference_wanted(loss_type: str, ref_model) -> None:
    """ref_model exactly when the loss_type needs a reference model (asft)."""
    needs = member(loss_type).needs_reference
    if needs and ref_model is None:
        raise ValueError(
            f"patch_model: loss_type={loss_type!r} needs ref_model= (the frozen reference model "
            "whose KL anchors the loss); for a frozen copy of the starting model pass "
            "ref_model=copy.deepcopy(model) before training (one more copy of the weights)"
        )
    if not needs and ref_model is not None:
        users = [name for name in loss_types() if member(name).needs_reference]
        raise ValueError(
            f"patch_model: ref_model is only used by loss_type={users[0]!r}, not {loss_type!r}"
        )


def _refuse_shadowed_forward(target: nn.Module) -> None:
    """A forward set on the instance would hide the patched class's forward."""
    shadowing = target.__dict__.get("forward")
    if shadowing is not None:
        name = getattr(shadowing, "__qualname__", type(shadowing).__name__)
        raise RuntimeError(
            f"patch_model: this {type(target).__name__}'s forward was replaced on the instance "
            f"(by {name}), which would hide the patch. Patch the model before handing it to a "
            "trainer or wrapper (TRL's SFTTrainer and accelerate's autocast set model.forward); "
            "for TRL use fused_dft.integrations.trl.SFTTrainer."
        )


def _install(target: nn.Module, state: PatchState) -> PatchState:
    """Give the lm_head its slot and capture pre-hook, swap in the patched class and store the
    state (with the hook's id) on the model; returns that state."""
    state = _hook_head(_lm_head(target), state)
    target.__class__ = _patched_class(state.base_class)
    setattr(target, STATE_ATTR, state)
    return state


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
    # the head that carries the hook: the lm_head, or one replaced since the last patched call
    _unhook_head(_hooked_head(target, state), state)
    target.__class__ = state.base_class
    delattr(target, STATE_ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """True when patch_model is in effect on `model` (or on the base model of a PEFT model)."""
    return STATE_ATTR in _causal_lm(model, check=False).__dict__


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
    """Unpickling a patched model: an instance of base's patched class. Pickles name it by its
    module path (those of fused_dft 0.1.0 as fused_dft.transformers._new_patched, kept there)."""
    cls = _patched_class(base)
    return cls.__new__(cls, *args)
