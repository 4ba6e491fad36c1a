"""patch_model(model, loss_type="asft", ref_model=ref): the reference model run by the patch.

The oracle is written here from the formula, in float64, from full logits of both models: the
stock (unpatched) policy's logits p and the reference's logits q on the same batch, per valid
token (label shifted, not ignore_index)

    loss_t = -sg(p_y) log p_y + alpha * sum_v q_v (log q_v - log p_v)

averaged over the valid tokens (or summed / num_items_in_batch). The patched loss and every
gradient of the policy must equal it; the reference must stay frozen, out of the policy's
state_dict / parameters / dtype moves, and untouched by a training step.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    COMMON,
    RTOL,
    V,
    assert_grads_equal,
    ragged_batch,
    shifted,
)

ALPHA = 0.3  # larger than the default 0.1, so that a dropped or halved KL term shows


def build(family: str, seed: int, tied: bool = False):
    """A tiny config-built causal LM (fp32, eager attention)."""
    torch.manual_seed(seed)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](
        **COMMON, tie_word_embeddings=tied
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def left_padded_batch(seed: int = 1):
    """ragged_batch with row 1 left-padded and explicit position_ids, so a reference that did not
    get the attention_mask or the position_ids would compute other hidden states."""
    inputs, labels = ragged_batch(seed)
    mask = inputs["attention_mask"]
    mask[1] = 1
    mask[1, :3] = 0
    inputs["input_ids"][1, :3] = 0
    labels[1] = inputs["input_ids"][1].masked_fill(mask[1] == 0, -100)
    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs, labels


def asft_oracle(logits, ref_logits, shift_labels, alpha, ignore_index=-100, num_items=None):
    """DFT + alpha * KL(q || p) from full logits, float64, mean over valid tokens (or sum /
    num_items)."""
    logp = logits.double().log_softmax(-1)
    log_q = ref_logits.double().log_softmax(-1)
    valid = shift_labels != ignore_index
    logp_y = logp[valid].gather(-1, shift_labels[valid][:, None]).squeeze(-1)
    kl = (log_q.exp() * (log_q - logp)).sum(-1)[valid]
    per_token = -logp_y.detach().exp() * logp_y + alpha * kl
    return per_token.sum() / (valid.sum() if num_items is None else num_items)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# Llama and Qwen2 (Qwen2's q/k/v projections carry biases), each with an untied and a tied head
# (the tied head's weight is the embedding): loss and every policy gradient against the oracle,
# on a left-padded batch with position_ids and ignored labels; mean and num_items_in_batch.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("num_items", [None, 23])
def test_loss_and_gradients_equal_the_full_logits_formula(family, tied, num_items):
    policy, ref = build(family, 0, tied), build(family, 7, tied)
    stock = copy.deepcopy(policy)
    inputs, labels = left_padded_batch()
    before = snapshot(ref)
    fused_dft.patch_model(policy, loss_type="asft", ref_model=ref, asft_alpha=ALPHA)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out = policy(**inputs, labels=labels, **extra)
    out.loss.backward()

    with torch.no_grad():
        ref_logits = ref(**inputs).logits
    expected = asft_oracle(stock(**inputs).logits, ref_logits, shifted(labels), ALPHA, -100,
                           num_items)  # fmt: skip
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=RTOL, atol=ATOL)
    assert_grads_equal(policy, stock)
    # the reference: frozen, in eval mode, no gradient, unchanged
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.grad is None for p in ref.parameters())
    for name, value in ref.state_dict().items():
        assert torch.equal(value, before[name]), name


# The KL term is really there: with alpha = 0 the loss is plain DFT of the policy, and the
# difference to alpha = ALPHA is ALPHA times the mean KL (so neither term is dropped or doubled).
def test_alpha_scales_only_the_kl_term():
    policy, ref = build("llama", 0), build("llama", 7)
    inputs, labels = left_padded_batch()
    losses = {}
    for alpha in (0.0, ALPHA):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=ref, asft_alpha=alpha)
        with torch.no_grad():
            losses[alpha] = policy(**inputs, labels=labels).loss.double()
    fused_dft.unpatch_model(policy)
    with torch.no_grad():
        logits, ref_logits = policy(**inputs).logits, ref(**inputs).logits
    y = shifted(labels)
    dft = asft_oracle(logits, ref_logits, y, 0.0)
    kl = (asft_oracle(logits, ref_logits, y, 1.0) - dft).item()
    assert kl > 1e-3
    torch.testing.assert_close(losses[0.0], dft, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(losses[ALPHA] - losses[0.0], torch.tensor(ALPHA * kl).double(),
                               rtol=1e-3, atol=ATOL)  # fmt: skip


# A custom ignore_index: those positions count neither in DFT nor in the KL mean.
def test_ignore_index_drops_tokens_from_both_terms():
    policy, ref = build("qwen2", 0), build("qwen2", 7)
    stock = copy.deepcopy(policy)
    inputs, labels = left_padded_batch(seed=4)
    labels = labels.masked_fill(labels == -100, -7)
    labels[2, 2:6] = -7
    # verify=False: the stock forward's own check uses -100 (as for every loss_type)
    fused_dft.patch_model(policy, loss_type="asft", ref_model=ref, ignore_index=-7, verify=False)
    loss = policy(**inputs, labels=labels).loss
    with torch.no_grad():
        expected = asft_oracle(stock(**inputs).logits, ref(**inputs).logits,
                               shifted(labels, fill=-7), 0.1, ignore_index=-7)  # fmt: skip
    torch.testing.assert_close(loss.double(), expected, rtol=RTOL, atol=ATOL)


# A training step (SGD on the policy's parameters, as Trainer builds its optimizer): the policy
# moves, the reference does not; the reference is in neither the policy's state_dict, its
# parameters nor its dtype moves, and eval mode of the policy still computes the KL.
def test_reference_is_held_beside_the_policy_not_inside_it():
    policy, ref = build("llama", 0), build("llama", 7)
    keys, count = set(policy.state_dict()), len(list(policy.parameters()))
    fused_dft.patch_model(policy, loss_type="asft", ref_model=ref)
    assert set(policy.state_dict()) == keys and len(list(policy.parameters())) == count
    assert not any(m is ref for m in policy.modules())
    before, moved = snapshot(ref), snapshot(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    inputs, labels = left_padded_batch()
    policy(**inputs, labels=labels).loss.backward()
    optimizer.step()
    assert any(not torch.equal(v, moved[k]) for k, v in policy.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    assert all(p.grad is None for p in ref.parameters())

    # a dtype move of the policy leaves the reference's dtype; the loss casts its inputs (right
    # padding here: in float64, eager attention gives NaN at a left pad that sees no key)
    inputs, labels = ragged_batch()
    policy.double()
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    policy.eval()
    ref.train()  # put back in eval mode by the next call
    with torch.no_grad():
        out = policy(**inputs, labels=labels)
        expected = asft_oracle(out.logits, ref.eval()(**inputs).logits, shifted(labels), 0.1)
    assert out.logits is not None  # eval keeps the logits by default
    torch.testing.assert_close(out.loss.double(), expected, rtol=RTOL, atol=ATOL)


# copy.deepcopy of the policy shares the frozen reference; a pickle leaves it out and the
# unpickled model says so at its first loss, naming what to do.
def test_copies_share_the_reference_and_pickles_leave_it_out():
    policy, ref = build("llama", 0), build("llama", 7)
    fused_dft.patch_model(policy, loss_type="asft", ref_model=ref)
    copied = copy.deepcopy(policy)
    assert copied._fused_dft_patch.ref_model.module is ref
    inputs, labels = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(copied(**inputs, labels=labels).loss,
                                   policy(**inputs, labels=labels).loss)  # fmt: skip
    restored = pickle.loads(pickle.dumps(policy))
    with pytest.raises(RuntimeError, match="unpickled without its asft reference model"):
        restored(**inputs, labels=labels)


def test_bad_reference_arguments_are_refused_before_patching():
    policy = build("llama", 0)
    with pytest.raises(ValueError, match=r"loss_type='asft' needs ref_model="):
        fused_dft.patch_model(policy, loss_type="asft")
    with pytest.raises(ValueError, match="ref_model is only used by loss_type='asft', not 'dft'"):
        fused_dft.patch_model(policy, loss_type="dft", ref_model=build("llama", 7))
    with pytest.raises(TypeError, match="ref_model must be a Hugging Face causal LM"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model="Qwen/Qwen2-0.5B")
    with pytest.raises(TypeError, match="ref_model is not usable"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=build("llama", 7).model)
    with pytest.raises(ValueError, match="ref_model is the model being patched"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=policy)
    torch.manual_seed(0)
    other_vocab = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**COMMON, "vocab_size": V + 1})
    )
    with pytest.raises(ValueError, match=f"ref_model's lm_head has a vocabulary of {V + 1}"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=other_vocab)
    granite = transformers.GraniteForCausalLM(
        transformers.GraniteConfig(**COMMON, logits_scaling=4.0)
    )
    with pytest.raises(ValueError, match="ref_model's config transforms its logits"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=granite)
    partitioned = build("llama", 7)
    partitioned.model.layers[0].mlp.up_proj.weight.ds_id = 0  # what ZeRO-3 marks
    with pytest.raises(ValueError, match="ref_model is partitioned by DeepSpeed ZeRO-3"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=partitioned)
    with pytest.raises(ValueError, match="asft_alpha must be"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=build("llama", 7),
                              asft_alpha=-0.1)  # fmt: skip
    assert not fused_dft.is_patched(policy)


# A tensor-parallel (vocab-parallel) lm_head: the asft loss has no vocab-parallel path, so the
# patch refuses it up front (a stand-in for parallelize_module: the check that detects it).
def test_tensor_parallel_head_is_refused(monkeypatch):
    import fused_dft.hf.lifecycle as lifecycle

    monkeypatch.setattr(lifecycle, "_is_tensor_parallel", lambda model, head: True)
    policy = build("llama", 0)
    with pytest.raises(ValueError, match="tensor-parallel"):
        fused_dft.patch_model(policy, loss_type="asft", ref_model=build("llama", 7))
    assert not fused_dft.is_patched(policy)
