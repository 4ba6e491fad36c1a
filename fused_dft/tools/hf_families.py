"""`fused-dft families`: patch_model tried on every causal-LM family of the installed transformers.

For each entry of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES a tiny model is built from the
family's own default config, shrunk (see `tiny_config`), and compared as a new user would:
  - patch_model(verify=True) either patches it or refuses it with a message (a refusal is fine, a
    crash is a failure);
  - training mode, a ragged batch (padding, a masked prompt): the loss and every parameter
    gradient of the patched model against DFT computed from the stock model's logits, plus the
    stock forward's own router loss (loss_with_labels - CE(logits): whatever the family adds to
    its cross-entropy, with its gradient), and the router loss itself for MoE families;
  - eval mode with labels: the logits equal the stock ones;
  - generate (greedy) gives the stock tokens; unpatch_model restores the stock forward.
Each family gets one line: ok, refused (the reason), failed (what and by how much), or not built
(the tiny model could not be built or its stock forward fails on this input: nothing to test).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import time
import warnings

import torch
import torch.nn.functional as F

VOCAB = 301  # odd, not a multiple of any tile size
# Sizes of a tiny model, applied to every attribute a family's config has (sub-configs too).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "vocab_size": VOCAB,
    "embedding_size": 64,
    # GPT-2 style names
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 128,
    "n_positions": 256,
    "n_ctx": 256,
    # seq2seq style names
    "d_model": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "num_layers": 2,
    "num_heads": 4,
    "d_ff": 128,
    "ffn_dim": 128,
    # mixture of experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "rotary_dim": 8,
    "moe_k": 2,
    "n_words": VOCAB,
    "emb_dim": 64,
    # state-space and linear-attention layers
    "state_size": 8,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "time_step_rank": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
}
# Logit transforms a family may apply after lm_head: values that change the logits a lot.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": 2.0,
    "logit_scale": 0.5,
    "logits_scaling": 4.0,
    "lm_head_multiplier": 0.5,
    "output_multiplier": 0.5,
}
ZERO = ("dropout", "pdrop", "jitter", "layerdrop", "drop_path")  # randomness off in training mode
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DERIVED = ("head_dim", "num_key_value_heads")  # None in some defaults, read as numbers anyway
MAX_LAYERS = 4  # hybrid families keep one layer of each kind, up to this many
LOSS_RTOL = 1e-5  # fp32: the fused loss against DFT from the stock logits
GRAD_TOL = 1e-4  # fp32: max|g - g_ref| / max|g_ref| per parameter
GRAD_FLOOR = 1e-3  # ... with max|g_ref| at least this fraction of the model's largest gradient
LOGITS_TOL = 1e-5


@dataclasses.dataclass
class FamilyResult:
    model_type: str
    class_name: str
    status: str  # "ok", "refused", "failed", "not built"
    reason: str = ""
    numbers: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        text = f"{self.model_type:<26} {self.status:<9}"
        return f"{text} {self.reason}".rstrip()


# ---------------------------------------------------------------------------------------------
# Tiny models


def tiny_config(model_type: str):
    """The family's default config with every size attribute made tiny."""
    from transformers import AutoConfig

    return _shrink(AutoConfig.for_model(model_type))


def _shrink(config, as_dict: bool = False):
    from transformers import PretrainedConfig

    defaults = config.to_dict()
    fields = (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    )
    kwargs = {}
    for name, value in defaults.items():
        sub = getattr(config, name, None) if isinstance(value, dict) else None
        if isinstance(sub, PretrainedConfig):
            kwargs[name] = _shrink(sub, as_dict=True)
        elif name in TINY and (_is_number(value) or (value is None and name in DERIVED)):
            kwargs[name] = TINY[name]
        elif any(part in name for part in ZERO) and isinstance(value, float):
            kwargs[name] = 0.0
        elif name == "output_router_logits":
            kwargs[name] = True  # MoE: the router loss is part of the comparison
        elif name in LOGIT_TRANSFORMS and _is_number(value) and value not in (0, 1):
            kwargs[name] = LOGIT_TRANSFORMS[name]  # far from identity, so a wrong one shows
        elif name.endswith("aux_loss_coef") and _is_number(value):
            kwargs[name] = 0.3  # a router loss large enough to matter in the comparison
        elif name in TOKEN_IDS and isinstance(value, int) and value >= VOCAB:
            kwargs[name] = TOKEN_IDS[name]
        elif name == "is_decoder" and value is False:
            kwargs[name] = True  # BERT-style causal LMs need it, as their docs say
    if defaults.get("num_key_value_heads") == defaults.get("num_attention_heads") is not None:
        kwargs["num_key_value_heads"] = TINY["num_attention_heads"]  # the family has no GQA
    if _is_number(defaults.get("qk_rope_head_dim")) and "head_dim" in kwargs:
        kwargs["head_dim"] = TINY["qk_rope_head_dim"]  # multi-head latent attention: the rope part
    per_layer = defaults.get("per_layer_config")
    if isinstance(per_layer, dict):  # only the layers that remain
        kwargs["per_layer_config"] = {k: v for k, v in per_layer.items() if int(k) < 2}
    layer_types = defaults.get("layer_types")
    if "layer_types" in fields and isinstance(layer_types, (list, tuple)) and layer_types:
        kinds = list(dict.fromkeys(layer_types))[:MAX_LAYERS]
        kwargs["layer_types"] = kinds if len(kinds) > 1 else kinds * 2
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    if as_dict:
        return {**defaults, **kwargs}
    return type(config)(**kwargs)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_model(model_type: str, seed: int = 0):
    import transformers

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().train()


def ragged_batch(vocab: int, seed: int = 1, batch: int = 3, length: int = 11):
    """Right padding on two rows and a masked prompt: shifting, ignoring and the mean are tested."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, -4:] = 0
    attention_mask[2, -1:] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


# ---------------------------------------------------------------------------------------------
# The comparison


class Mismatch(AssertionError):
    pass


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return float((actual - expected).abs().max()) / max(scale, 1e-30) if expected.numel() else 0.0


def _dft_from_logits(logits, labels):
    """The oracle: DFT and CE means over the valid next-token labels, from full logits."""
    y = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    z = logits.float().reshape(-1, logits.shape[-1])
    valid = y != -100
    logp = z[valid].log_softmax(-1).gather(-1, y[valid, None]).squeeze(-1)
    return (-logp.detach().exp() * logp).mean(), (-logp).mean()


def _forward(model, seed, **kwargs):
    kwargs.setdefault("use_cache", False)  # as in training (hybrid caches need attention layers)
    torch.manual_seed(seed)  # families with random routing draw the same numbers in both models
    return model(**kwargs)


def compare(model_type: str) -> FamilyResult:
    """Build, patch and compare one family (see the module docstring)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import fused_dft

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    result = FamilyResult(model_type, class_name, "not built")
    start = time.perf_counter()
    try:
        stock = build_model(model_type)
        inputs, labels = ragged_batch(VOCAB)
        stock_out = _forward(stock, 0, **inputs, labels=labels)  # kept for the comparison
        if not torch.is_tensor(getattr(stock_out, "logits", None)):
            raise TypeError("its forward returns no logits")
        patched = _copy(stock, model_type)
    except Exception as exc:
        result.reason = f"{type(exc).__name__}: {_first_line(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    try:
        fused_dft.patch_model(patched)
    except (TypeError, ValueError) as exc:
        if str(exc).startswith("patch_model"):
            result.status, result.reason = "refused", _first_line(exc)
        else:
            result.status, result.reason = "failed", f"patch_model crashed: {_describe(exc)}"
        result.seconds = time.perf_counter() - start
        return result
    except Exception as exc:
        result.status, result.reason = "failed", f"patch_model crashed: {_describe(exc)}"
        result.seconds = time.perf_counter() - start
        return result

    try:
        notes = _check_patched(stock, stock_out, patched, inputs, labels, result.numbers)
        result.status, result.reason = "ok", notes
    except Mismatch as exc:
        result.status, result.reason = "failed", str(exc)
    except Exception as exc:
        result.status, result.reason = "failed", f"crashed: {_describe(exc)}"
    result.seconds = time.perf_counter() - start
    return result


def _copy(model, model_type: str):
    try:
        return copy.deepcopy(model)
    except RuntimeError:  # weight_norm parametrizations cannot be deep-copied: build it again
        twin = build_model(model_type)
        twin.load_state_dict(model.state_dict())
        return twin


def _check_patched(stock, out, patched, inputs, labels, numbers: dict) -> str:
    """`out`: the stock model's training forward on (inputs, labels), not yet backpropagated."""
    import fused_dft

    # 1. training: loss and every gradient against DFT from the stock logits (+ the stock's own
    #    extra terms: its loss minus the CE of its logits, i.e. the router loss with its coef)
    dft, ce = _dft_from_logits(out.logits, labels)
    expected = dft + (out.loss - ce) if getattr(out, "aux_loss", None) is not None else dft
    expected.backward()
    got = _forward(patched, 0, **inputs, labels=labels)
    got.loss.backward()
    if got.logits is not None:
        raise Mismatch("training output has logits")
    numbers["loss_rel_err"] = abs(float(got.loss) - float(expected)) / abs(float(expected))
    # the oracle's `loss - CE` carries the fp32 round-off of the stock CE (a few ulp of CE)
    floor = 8 * torch.finfo(torch.float32).eps * abs(float(ce)) / abs(float(expected))
    if not numbers["loss_rel_err"] <= LOSS_RTOL + floor:
        raise Mismatch(
            f"loss {float(got.loss):.8g}, expected {float(expected):.8g} "
            f"(rel err {numbers['loss_rel_err']:.1e})"
        )
    if getattr(out, "aux_loss", None) is not None:
        numbers["aux_rel_err"] = _rel(got.aux_loss, out.aux_loss)
        if not numbers["aux_rel_err"] <= LOSS_RTOL:
            raise Mismatch(
                f"router loss {float(got.aux_loss):.8g}, stock {float(out.aux_loss):.8g} "
                f"(rel err {numbers['aux_rel_err']:.1e})"
            )
    worst, checked = 0.0, 0
    stock_params = dict(stock.named_parameters())
    # gradients that vanish in exact arithmetic (a key bias under softmax) are round-off: judge
    # every tensor against a floor set by the largest gradient of the model
    scale = max(float(p.grad.abs().max()) for p in stock.parameters() if p.grad is not None)
    for name, p in patched.named_parameters():
        q = stock_params[name].grad
        if q is None or not q.any():
            if p.grad is not None and float(p.grad.abs().max()) > GRAD_FLOOR * scale:
                raise Mismatch(f"gradient of {name} where the stock has none")
            continue
        if p.grad is None:
            raise Mismatch(f"no gradient of {name}; the stock has one")
        err = float((p.grad - q).abs().max()) / max(float(q.abs().max()), GRAD_FLOOR * scale)
        checked += 1
        if not err <= GRAD_TOL:
            raise Mismatch(f"gradient of {name}: max err {err:.1e} of its largest entry")
        worst = max(worst, err)
    numbers["grad_max_rel_err"], numbers["grads_checked"] = worst, checked

    # 2. eval with labels: the stock logits, the fused loss
    stock.eval(), patched.eval()
    with torch.no_grad():
        ref = _forward(stock, 0, **inputs)
        got = _forward(patched, 0, **inputs, labels=labels)
    numbers["eval_logits_err"] = _rel(got.logits, ref.logits)
    if not numbers["eval_logits_err"] <= LOGITS_TOL:
        raise Mismatch(f"eval logits differ, max err {numbers['eval_logits_err']:.1e}")

    # 3. generate: greedy tokens of the patched model equal the stock ones
    notes = []
    prompt = inputs["input_ids"][:1, :5]
    try:
        with _quiet():
            before = stock.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception as exc:
        notes.append(f"generate not checked (the stock model fails: {type(exc).__name__})")
    else:
        with _quiet():
            after = patched.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
        if not torch.equal(before, after):
            raise Mismatch("generate gives other tokens than the stock model")

    # 4. unpatch: the stock class and forward again
    fused_dft.unpatch_model(patched)
    if type(patched) is not type(stock) or fused_dft.is_patched(patched):
        raise Mismatch("unpatch_model did not restore the stock class")
    with torch.no_grad():
        again = _forward(patched, 0, **inputs)
    if _rel(again.logits, ref.logits) > LOGITS_TOL:
        raise Mismatch("logits after unpatch_model differ from the stock ones")
    return "; ".join(notes)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_first_line(exc)}"


# ---------------------------------------------------------------------------------------------
# The sweep and its table


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(types: list[str] | None = None, progress=None) -> list[FamilyResult]:
    import transformers

    transformers.logging.set_verbosity_error()
    results = []
    for model_type in types or model_types():
        with _quiet():
            result = compare(model_type)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def counts(results: list[FamilyResult]) -> dict[str, int]:
    return {
        s: sum(r.status == s for r in results) for s in ("ok", "refused", "failed", "not built")
    }


def markdown(results: list[FamilyResult], header: str) -> str:
    c = counts(results)
    lines = [
        header,
        "",
        f"{len(results)} families: **{c['ok']} ok**, {c['refused']} refused, {c['failed']} failed, "
        f"{c['not built']} not built.",
        "",
        "| model_type | class | status | reason / notes | loss err | router loss err | grad err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = r.numbers.get("loss_rel_err")
        grad = r.numbers.get("grad_max_rel_err")
        aux = r.numbers.get("aux_rel_err")
        cells = [
            f"`{r.model_type}`",
            r.class_name,
            r.status,
            r.reason.replace("|", "/"),
            "" if loss is None else f"{loss:.0e}",
            "" if aux is None else f"{aux:.0e}",
            "" if grad is None else f"{grad:.0e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
