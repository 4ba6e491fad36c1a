"""patch_model / unpatch_model: train a Hugging Face causal LM with the fused loss, no logits built.

One generic causal-LM forward serves every family: run the decoder (`model.base_model`), take the
last hidden states and compute the loss with `fused_linear_dft_loss` against the shifted labels.
Whatever a family does between its lm_head and its loss is read from the config and handed to the
kernel (`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`), and the
MoE router loss is added as the family's own forward adds it. Calls without labels (generation,
inference) run the stock forward untouched. `verify=True` checks all of this against the stock
forward at patch time and refuses the model when it differs.

How the patch is applied: the instance's `__class__` is swapped for a subclass of its own class
(created once per class, with the same name and module) whose only additions are `forward` and
pickling support; `unpatch_model` swaps it back. Nothing process-wide changes, and compared with
binding a forward on the instance (`model.forward = MethodType(...)`) this keeps:
  - the class-level signature that Trainer and TRL inspect (`find_labels(model.__class__)`, the
    dataset columns kept, `model_accepts_loss_kwargs`): the new forward wraps the stock one
    (`functools.wraps`), so `inspect.signature` reports the stock parameters, `**kwargs` included;
  - instance-level wrappers working on top of it (accelerate's autocast wrapper, TRL's fused LM
    head), `nn.DataParallel` replicas (a bound method would stay bound to the original module),
    `copy.deepcopy`, and `pickle` / `torch.save` (a pickled bound method comes back as the
    stock forward, silently unpatching the copy);
  - the class name that `save_pretrained` writes into `config.architectures`.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import inspect
import math
import sys
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loss import fused_linear_dft_loss, make_options, validate_impl
from .parallel import is_dtensor

STATE_ATTR = "_fused_dft_patch"
# Batch figures of the fused pass attached to the output (detached; means over the valid tokens).
STAT_NAMES = ("ce_loss", "entropy", "token_accuracy", "num_tokens")
# Options of patch_model that go to the loss; the logit transforms come from the config instead.
LOSS_OPTIONS = ("chunk_size", "ignore_index")

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

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits a stock forward returns, with the same operations in the same dtype."""
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

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
    chunk_size: int | None
    ignore_index: int
    eval_logits: bool
    transform: LogitTransform
    is_moe: bool
    output_class: type
    output_fields: frozenset[str]  # read at patch time: dataclasses.fields is not traceable
    positional: tuple[str, ...]


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
    and TRL) makes the loss sum / num_items_in_batch, as the stock loss does.
    In eval mode (`model.training` False) with labels the logits are also returned, built as the
    stock forward builds them, so `compute_metrics` works; `eval_logits=False` keeps eval
    logits-free too. A per-call `skip_logits=True/False` kwarg overrides both.
    loss_options: `chunk_size` (see fused_linear_dft_loss), `ignore_index` (default -100).
    verify: check on a short random input that the logits and the cross-entropy the patched path
    computes match the stock forward's, and refuse the model otherwise. It runs the stock forward
    in this process, so patch before fully_shard / parallelize_module (the patch is kept), or pass
    verify=False for a model already sharded.

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
    chunk_size = loss_options.get("chunk_size")
    ignore_index = loss_options.get("ignore_index", -100)
    make_options(loss_type=loss_type, ignore_index=ignore_index)
    validate_impl(impl, chunk_size)

    target = _causal_lm(model)
    if is_patched(target):
        unpatch_model(target)
    shadowing = target.__dict__.get("forward")
    if shadowing is not None:
        name = getattr(shadowing, "__qualname__", type(shadowing).__name__)
        raise RuntimeError(
            f"patch_model: this {type(target).__name__}'s forward was replaced on the instance "
            f"(by {name}), which would hide the patch. Patch the model before handing it to a "
            "trainer or wrapper (TRL's SFTTrainer and accelerate's autocast set model.forward)."
        )
    _lm_head(target)

    base = type(target)
    config = _text_config(target)
    output_class = _output_class(base, hasattr(config, "output_router_logits"))
    state = PatchState(
        base_class=base,
        loss_type=loss_type,
        impl=impl,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        eval_logits=bool(eval_logits),
        transform=_read_transform(config),
        is_moe=hasattr(config, "output_router_logits"),
        output_class=output_class,
        output_fields=frozenset(f.name for f in dataclasses.fields(output_class)),
        positional=_positional_names(base.forward),
    )
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
    return model


def is_patched(model: nn.Module) -> bool:
    """True when patch_model is in effect on `model` (or on the base model of a PEFT model)."""
    return STATE_ATTR in _causal_lm(model, check=False).__dict__


# ---------------------------------------------------------------------------------------------
# The patched forward


def _fused_forward(model, stock_forward, args: tuple, kwargs: dict):
    state: PatchState | None = model.__dict__.get(STATE_ATTR)
    if args:
        kwargs = _bind_positional(state, stock_forward, args, kwargs)
    if state is None or kwargs.get("labels") is None:
        # no labels (generation, inference), or unpatched while someone still holds this forward
        return stock_forward(model, **kwargs)
    return _loss_forward(model, state, kwargs)


def _loss_forward(model, state: PatchState, kwargs: dict):
    """decoder -> last hidden states -> fused loss (+ router loss); logits only when asked."""
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", state.ignore_index)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    skip_logits = kwargs.pop("skip_logits", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    config = _text_config(model)
    output_router_logits = False
    if state.is_moe:
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = bool(config.output_router_logits)
        kwargs["output_router_logits"] = output_router_logits

    # 1. the decoder, called with the forward's remaining kwargs as the stock forward calls it
    decoder_out = model.base_model(**kwargs, return_dict=True)
    hidden = decoder_out[0]

    # 2. next-token labels: shift, unless the caller passed them shifted (context parallelism)
    lm_head = _lm_head(model)
    weight = lm_head.weight
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_for_loss = hidden.to(weight.device)
    shift_labels = shift_labels.to(weight.device)

    # 3. the fused loss, in the dtype the lm_head would run in: autocast's, else the weight's
    device_type = hidden_for_loss.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast_on else weight.dtype

    def head_loss(hidden_in, labels_in):
        weight, bias = _head_params(model, lm_head)  # read after FSDP's unshard
        return fused_linear_dft_loss(
            hidden_in.to(dtype),
            weight.to(dtype),
            labels_in,
            None if bias is None else bias.to(dtype),
            loss_type=state.loss_type,
            ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum",
            logit_scale=state.transform.kernel_scale,
            softcap=state.transform.softcap,
            impl=state.impl,
            return_stats=True,
            chunk_size=state.chunk_size,
        )

    with torch.autocast(device_type, enabled=False) if autocast_on else nullcontext():
        loss, stats = _as_lm_head_forward(lm_head, head_loss, hidden_for_loss, shift_labels)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch

    # 4. MoE: the router load-balancing loss, as the family's forward adds it
    aux_loss = None
    if output_router_logits:
        aux_loss = _router_aux_loss(model, state, decoder_out, kwargs.get("attention_mask"))
        loss = loss + _router_aux_coef(model, config) * aux_loss.to(loss.device)

    # 5. logits only for evaluation (metrics need them), or when the caller asks
    if skip_logits is None:
        skip_logits = model.training or not state.eval_logits
    logits = None
    if not skip_logits:
        logits = state.transform.apply(lm_head(_keep_positions(hidden, logits_to_keep)))

    fields = state.output_fields
    values = {k: v for k, v in decoder_out.items() if k in fields and k != "last_hidden_state"}
    values.update(loss=loss, logits=logits)
    if "aux_loss" in fields:
        values["aux_loss"] = aux_loss
    out = state.output_class(**values)
    figures = (stats.ce, stats.entropy, stats.accuracy, stats.num_tokens)
    for name, value in zip(STAT_NAMES, figures):
        if logits is None:
            # a key as well as an attribute: survives wrappers that rebuild the output dict
            # (accelerate's mixed-precision forward wrapper does)
            out[name] = value
        else:
            # attribute only: Trainer.prediction_step gathers every key but "loss" as predictions
            object.__setattr__(out, name, value)
    return out if return_dict else out.to_tuple()


def _router_aux_loss(model, state: PatchState, decoder_out, attention_mask) -> torch.Tensor:
    module = sys.modules.get(state.base_class.__module__)
    loss_func = getattr(module, "load_balancing_loss_func", None)
    if loss_func is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        loss_func = load_balancing_loss_func
    config = _text_config(model)
    num_experts = _first_attr(
        (model, "num_experts"), (config, "num_experts"), (config, "num_local_experts")
    )
    top_k = _first_attr((model, "num_experts_per_tok"), (config, "num_experts_per_tok"))
    return loss_func(decoder_out.router_logits, num_experts, top_k, attention_mask)


def _router_aux_coef(model, config) -> float:
    return _first_attr(
        (model, "router_aux_loss_coef"), (model, "aux_loss_coef"), (config, "router_aux_loss_coef")
    )


def _first_attr(*candidates):
    for obj, name in candidates:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    names = ", ".join(name for _, name in candidates)
    raise AttributeError(f"fused_dft: cannot find the MoE setting ({names}) on the model or config")


def _keep_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The stock `logits_to_keep`: an int keeps the last n positions (0: all), a tensor indexes."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


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

    @functools.wraps(stock_forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, stock_forward, args, kwargs)

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
            "__reduce_ex__": __reduce_ex__,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        },
    )
    _PATCHED_CLASSES[base] = cls
    return cls


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
    ):
        raise TypeError(
            f"patch_model needs a Hugging Face causal LM (a PreTrainedModel with an lm_head), "
            f"got {type(model).__name__}"
        )
    return model


def _lm_head(model) -> nn.Module:
    """The output projection; the fused loss computes F.linear(hidden, lm_head.weight, bias)."""
    name = type(model).__name__
    decoder = getattr(model, "base_model", model)
    head = model.get_output_embeddings()
    if decoder is model or head is None:
        raise TypeError(
            f"patch_model: {name} has no decoder + lm_head structure (base_model: "
            f"{type(decoder).__name__ if decoder is not model else 'missing'}, "
            f"get_output_embeddings(): {type(head).__name__ if head is not None else 'None'}); "
            "it needs a causal LM such as LlamaForCausalLM"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"patch_model: the lm_head of {name} is a {type(head).__qualname__}, not a plain "
            "nn.Linear, so the fused loss cannot reproduce it (a PEFT adapter or "
            "modules_to_save on lm_head, or a quantized head, are not supported: keep lm_head "
            "out of target_modules)"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"patch_model: the lm_head weight of {name} is not a 2-D tensor")
    return head


def _text_config(model):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _read_transform(config) -> LogitTransform:
    def number(name):
        value = getattr(config, name, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"patch_model: config.{name} must be a number, got {value!r}")
        return float(value)

    return LogitTransform(
        multiply=number("logit_scale"),
        divide=number("logits_scaling"),
        softcap=number("final_logit_softcapping"),
    )


def _output_class(base: type, is_moe: bool) -> type:
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast
    from transformers.utils import ModelOutput

    annotation = inspect.signature(base.forward).return_annotation
    if isinstance(annotation, type) and issubclass(annotation, ModelOutput):
        fields = {f.name for f in dataclasses.fields(annotation)}
        if {"loss", "logits"} <= fields:
            return annotation
    return MoeCausalLMOutputWithPast if is_moe else CausalLMOutputWithPast


def _positional_names(forward) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
    return tuple(p.name for p in params if p.kind in kinds)


def _verify(model, state: PatchState) -> None:
    """Refuse the model unless the patched path reproduces the stock logits and cross-entropy."""
    _refuse_sharded_for_verify(model)
    weight = _lm_head(model).weight
    vocab = weight.shape[0]
    generator = torch.Generator().manual_seed(0)  # the caller's RNG stream stays untouched
    input_ids = torch.randint(0, vocab, (2, 9), generator=generator).to(weight.device)
    labels = input_ids.clone()
    labels[0, :3] = state.ignore_index
    extra = {"use_cache": False}
    if state.is_moe:
        extra["output_router_logits"] = True
    name = f"{state.base_class.__qualname__} ({state.base_class.__module__})"

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            stock = state.base_class.forward(
                model, input_ids=input_ids, labels=labels, return_dict=True, **extra
            )
            hidden = model.base_model(input_ids=input_ids, return_dict=True, **extra)[0]
            ours = F.linear(hidden.to(weight.device), weight, _lm_head(model).bias)
            ours = state.transform.kernel_view(ours)
            ce_state = dataclasses.replace(state, loss_type="ce", eval_logits=False)
            ce = _loss_forward(model, ce_state, {"input_ids": input_ids, "labels": labels, **extra})
    finally:
        for module, training in modes:
            module.training = training

    stock_logits = getattr(stock, "logits", None)
    if stock_logits is None or tuple(stock_logits.shape) != tuple(ours.shape):
        got = None if stock_logits is None else tuple(stock_logits.shape)
        raise ValueError(
            f"patch_model(verify=True): {name} returns logits of shape {got}, but lm_head on the "
            f"last hidden states gives {tuple(ours.shape)}; this model cannot be patched"
        )
    tol = max(1e-5, 4 * torch.finfo(stock_logits.dtype).eps)
    reference = stock_logits.to(ours.dtype)
    excess = (ours - reference).abs() - tol * (1 + reference.abs())
    if not bool((excess <= 0).all()):
        where = tuple(int(i) for i in torch.nonzero(excess > 0)[0])
        raise ValueError(
            f"patch_model(verify=True): the logits the fused loss would use differ from the stock "
            f"forward's for {name}: at index {where} fused_dft has {float(ours[where]):.6g}, the "
            f"model {float(reference[where]):.6g} (transforms read from the config: "
            f"{state.transform}). This family applies a logit transform fused_dft does not know, "
            "so training it with the fused loss would be wrong; the model was left unpatched."
        )
    stock_loss = getattr(stock, "loss", None)
    if stock_loss is None or not math.isclose(
        float(ce.loss), float(stock_loss), rel_tol=tol, abs_tol=tol
    ):
        raise ValueError(
            f"patch_model(verify=True): the cross-entropy the patched forward computes "
            f"({float(ce.loss):.6g}) differs from the stock forward's loss "
            f"({None if stock_loss is None else float(stock_loss)}) for {name}; its loss is not "
            "the causal-LM cross-entropy (+ router loss) fused_dft reproduces, so it was left "
            "unpatched."
        )
