"""torch.compile without graph breaks or recompiles, and the sync-free (validate="device") path.

Compiling on the CPU is slow (inductor builds C++), so most cases compile with the "aot_eager"
backend, which runs dynamo and AOTAutograd exactly as inductor does (the fake implementations,
the autograd registration, dynamic shapes) and only skips code generation; one case per entry
point compiles with inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_dft

from .helpers import assert_close, make_inputs, use_impl

N, D, V = 37, 40, 129
IMPLS = ["auto", "chunked", "fused", "reference"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_and_grads(fn, hidden, weight, labels, bias, **opts):
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss, stats = fn(h, w, labels, b, return_stats=True, **opts)
    upstream = torch.linspace(-1, 2, loss.numel()).reshape(loss.shape)
    grads = torch.autograd.grad(loss, [h, w, b], upstream)
    return loss.detach(), grads, stats


def count_compiles():
    """A backend that counts how often dynamo hands it a graph, then runs it as aot_eager."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = []

    def compiler(gm, example_inputs):
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=compiler, bw_compiler=compiler)

    def backend(gm, example_inputs):
        seen.append(gm)
        return aot(gm, example_inputs)

    return backend, seen


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", IMPLS)
def test_compiled_equals_eager_without_graph_breaks(case, reduction, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    opts = dict(impl=impl, reduction=reduction, softcap=3.0, z_loss=1e-3)
    explained = torch._dynamo.explain(fused_dft.fused_linear_dft_loss)(
        hidden, weight, labels, bias, **opts
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(fused_dft.fused_linear_dft_loss, backend="aot_eager", fullgraph=True)
    loss_c, grads_c, stats_c = loss_and_grads(compiled, hidden, weight, labels, bias, **opts)
    loss_e, grads_e, stats_e = loss_and_grads(
        fused_dft.fused_linear_dft_loss, hidden, weight, labels, bias, **opts
    )
    assert_close(loss_c, loss_e, "loss", rtol=1e-6, atol_frac=1e-7)
    for name, g_c, g_e in zip(("dh", "dW", "db"), grads_c, grads_e):
        assert_close(g_c, g_e, name, rtol=1e-6, atol_frac=1e-7)
    for name in ("ce", "entropy", "accuracy", "lse", "num_tokens"):
        assert_close(getattr(stats_c, name), getattr(stats_e, name), name, rtol=1e-6)


# asft through the custom ops: with reduction="none" the forward op also returns each token's
# lse_q (its lse output is (2, N)), which the fake implementation must shape alike
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["chunked", "fused"])
def test_asft_compiles_without_graph_breaks(case, reduction, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    ref = dict(ref_hidden=torch.randn(N, D + 8), ref_weight=torch.randn(V, D + 8) / D**0.5)
    opts = dict(impl=impl, reduction=reduction, loss_type="asft", softcap=3.0, **ref)
    explained = torch._dynamo.explain(fused_dft.fused_linear_dft_loss)(
        hidden, weight, labels, bias, **opts
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fused_dft.fused_linear_dft_loss, backend="aot_eager", fullgraph=True)
    loss_c, grads_c, _ = loss_and_grads(compiled, hidden, weight, labels, bias, **opts)
    loss_e, grads_e, _ = loss_and_grads(
        fused_dft.fused_linear_dft_loss, hidden, weight, labels, bias, **opts
    )
    assert_close(loss_c, loss_e, "loss", rtol=1e-6, atol_frac=1e-7)
    for name, g_c, g_e in zip(("dh", "dW", "db"), grads_c, grads_e):
        assert_close(g_c, g_e, name, rtol=1e-6, atol_frac=1e-7)


def test_inductor_compiles_the_module():
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    module = fused_dft.FusedLinearDFTLoss(loss_type="eaft")
    compiled = torch.compile(module, fullgraph=True)
    results = []
    for fn in (compiled, module):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
        loss = fn(h, w, labels, b)
        results.append((loss.detach(), torch.autograd.grad(loss, [h, w, b])))
    (loss_c, grads_c), (loss_e, grads_e) = results
    assert_close(loss_c, loss_e, "loss", rtol=1e-6)
    for name, g_c, g_e in zip(("dh", "dW", "db"), grads_c, grads_e):
        assert_close(g_c, g_e, name, rtol=1e-6)


# new token counts and new numbers of ignored tokens: at most one static and one dynamic graph
@pytest.mark.parametrize("case", ["auto", "fused"])
def test_no_recompile_when_tokens_or_ignored_change(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    backend, graphs = count_compiles()
    compiled = torch.compile(fused_dft.fused_linear_dft_loss, backend=backend, fullgraph=True)
    weight = torch.randn(V, D, requires_grad=True)
    for n, ignored in ((20, 0.3), (33, 0.1), (47, 0.6), (47, 0.95), (12, 0.0)):
        hidden = torch.randn(n, D, requires_grad=True)
        labels = torch.randint(0, V, (n,))
        labels[torch.rand(n) < ignored] = -100
        loss = compiled(hidden, weight, labels, impl=impl)
        loss.backward()
        expected = fused_dft.fused_linear_dft_loss(hidden.detach(), weight.detach(), labels)
        assert_close(loss.detach(), expected, f"loss at n={n}", rtol=1e-6)
    assert len(graphs) <= 2, f"{len(graphs)} compiles"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_patched_model_compiles_fullgraph(backend):
    stock = tiny_llama().train()
    model = fused_dft.patch_model(copy.deepcopy(stock)).train()
    ids = torch.randint(0, 101, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100

    def step(model, ids, labels):
        out = model(input_ids=ids, labels=labels)
        return out.loss, out.ce_loss

    explained = torch._dynamo.explain(step)(model, ids, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    loss, ce = compiled(model, ids, labels)
    loss.backward()
    eager = fused_dft.patch_model(copy.deepcopy(stock)).train()
    loss_e, ce_e = step(eager, ids, labels)
    loss_e.backward()
    assert_close(loss.detach(), loss_e.detach(), "loss", rtol=1e-6)
    assert_close(ce, ce_e, "ce", rtol=1e-6)
    for (name, p), p_e in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, p_e.grad, name, rtol=1e-5, atol_frac=1e-6)


# --- validate="device" / "off": the sync-free path -------------------------------------------


# the static selection (every row, non-ignored first, count on the device) gives what the exact
# selection gives, with a NaN in an ignored row's hidden state kept out of every result
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["chunked", "chunked_small_tiles", "fused", "fused_small_tiles"])
def test_device_validation_matches_sync(case, reduction, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True, ignore_frac=0.4)
    hidden[int((labels == -100).nonzero()[0, 0])] = float("nan")
    opts = dict(impl=impl, reduction=reduction, chunk_size=8, loss_type="eaft")
    results = {}
    for mode in ("sync", "device", "off"):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        loss, stats = fused_dft.fused_linear_dft_loss(
            h, w, labels, b, validate=mode, return_stats=True, **opts
        )
        grads = torch.autograd.grad(loss, [h, w, b], torch.ones_like(loss))
        results[mode] = (loss, grads, stats)
    loss_s, grads_s, stats_s = results["sync"]
    assert bool(torch.isfinite(loss_s).all())
    for mode in ("device", "off"):
        loss, grads, stats = results[mode]
        assert_close(loss, loss_s, f"{mode} loss", rtol=1e-6, atol_frac=1e-7)
        for name, g, g_s in zip(("dh", "dW", "db"), grads, grads_s):
            assert bool(torch.isfinite(g).all()), f"{mode}: NaN leaked into {name}"
            assert_close(g, g_s, f"{mode} {name}", rtol=1e-5, atol_frac=1e-6)
        assert_close(stats.entropy, stats_s.entropy, f"{mode} entropy", rtol=1e-5)


@pytest.mark.parametrize("case", ["auto", "chunked", "fused", "reference"])
def test_bad_label_without_sync_gives_nan_and_no_out_of_range_read(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, _ = make_inputs(N, D, V)
    labels[5] = V + 1000  # an out-of-range index would fault on a GPU, raise on the CPU
    labels[6] = -7
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\).*\[5\] = {V + 1000}"):
        fused_dft.fused_linear_dft_loss(hidden, weight, labels, impl=impl, validate="sync")
    w = weight.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(hidden, w, labels, impl=impl, validate="device")
    assert torch.isnan(loss), f"validate='device' gave the plausible loss {float(loss)}"
    (dw,) = torch.autograd.grad(loss, [w])
    assert bool(torch.isnan(dw).any())
    # "off": trained as if those labels were absent, and still no out-of-range read
    loss = fused_dft.fused_linear_dft_loss(hidden, weight, labels, impl=impl, validate="off")
    assert bool(torch.isfinite(loss))


def test_validate_defaults_and_bad_value():
    from fused_dft.arguments import default_validate

    assert default_validate(torch.device("cpu")) == "sync"
    assert default_validate(torch.device("cuda", 0)) == "device"
    hidden, weight, labels, _ = make_inputs(N, D, V)
    with pytest.raises(ValueError, match="validate must be None or one of"):
        fused_dft.fused_linear_dft_loss(hidden, weight, labels, validate="strict")


# a bf16 dh scaled by an upstream gradient that bf16 cannot represent (HF's 1/num_items_in_batch):
# the product is taken in fp32, so dh is rounded once, with no systematic bias
def test_bf16_upstream_scaling_has_no_bias():
    hidden, weight, labels, bias = make_inputs(N, D, V, dtype=torch.bfloat16, bias=True)
    h = hidden.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, reduction="sum")
    (dh_unit,) = torch.autograd.grad(loss, [h])
    h = hidden.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, reduction="sum")
    (dh,) = torch.autograd.grad(loss / 204, [h])
    nonzero = dh_unit != 0
    ratio = dh.float()[nonzero] / (dh_unit.float()[nonzero] / 204)
    assert abs(float(ratio.mean()) - 1) < 1e-3, float(ratio.mean())
    assert float((ratio - 1).abs().max()) <= 2**-8


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_no_host_sync_on_cuda(impl):
    hidden, weight, labels, bias = (
        t.cuda() if t is not None else None for t in make_inputs(N, D, V, bias=True)
    )
    h = hidden.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, impl=impl)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = fused_dft.fused_linear_dft_loss(hidden, weight, labels, bias, validate="sync")
    assert_close(loss.detach(), expected, "loss", rtol=1e-5)


@cuda
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_cuda_graph_captures_forward_and_backward(impl):
    hidden, weight, labels, bias = (
        t.cuda() if t is not None else None for t in make_inputs(N, D, V, bias=True)
    )
    h = hidden.clone().requires_grad_(True)
    for _ in range(2):  # warm up (Triton compiles, allocator pools) on a side stream
        loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, impl=impl)
        loss.backward()
    h.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, impl=impl)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = fused_dft.fused_linear_dft_loss(hidden, weight, labels, bias, validate="sync")
    assert_close(loss.detach(), expected, "loss", rtol=1e-5)
    assert bool(torch.isfinite(h.grad).all())
