"""What the spawned ranks of test_distributed.py run: one process per rank, gloo on the CPU.

Each suite runs all its cases in one set of processes (a process costs seconds to start); every
case records None or the traceback of its failure per rank, and test_distributed.py turns each
case into a test. The truth is always one process: the closed-form float64 oracle of
test_loss_family.py for the loss, the stock Hugging Face model for the training set-ups.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import traceback
from pathlib import Path

import torch

# ragged on purpose: V = 37 is a multiple of neither 2 nor 3 ranks (shards 19 + 18, 13 + 13 + 11),
# and chunks of 5 tokens make several merges (collectives) per call
N, D, V = 23, 16, 37
CHUNK = 5
IGNORE = -100

# vocab-parallel cases: impl "auto" is the chunked path on torch ops (float64 here), "chunked" the
# Triton row kernel and "fused" the fused kernels (both fp32, through Triton's interpreter).
# `member` takes test_loss_family's member inputs (token_weights, z_loss, softcap, logit_scale,
# bias).
VOCAB_PARALLEL = {
    "dft-mean-bias-softcap": dict(opts=dict(softcap=3.0)),
    "dft-sum-logit-scale-no-bias": dict(opts=dict(reduction="sum", logit_scale=0.7), bias=False),
    "dft-none-3d-leading-shape": dict(opts=dict(reduction="none"), lead=(3, 7)),
    "ce-mean": dict(opts=dict(loss_type="ce")),
    "ce-none-ignore-index": dict(opts=dict(loss_type="ce", reduction="none", ignore_index=-1)),
    "member-power": dict(member="power_half", opts=dict(reduction="sum")),
    "member-eaft": dict(member="eaft"),
    "member-psft": dict(member="psft", opts=dict(reduction="none")),
    "member-ce-label-smoothing": dict(member="ce_smoothed"),
    "member-dft-token-weights-z-loss": dict(member="dft", opts=dict(reduction="none")),
    "all-ignored": dict(labels="all_ignored"),
    "labels-in-first-shard-only": dict(labels="first_shard", opts=dict(loss_type="ce")),
    "replicate-dtensor-hidden": dict(hidden="replicate"),
    "frozen-weight": dict(hidden="frozen_weight", opts=dict(reduction="sum")),
    "triton-rows-dft-mean": dict(impl="chunked", opts=dict(softcap=3.0)),
    "fused-dft-mean-bias-softcap": dict(impl="fused", opts=dict(softcap=3.0)),
    "fused-ce-none": dict(impl="fused", opts=dict(loss_type="ce", reduction="none")),
    "fused-member-eaft-sum": dict(impl="fused", member="eaft", opts=dict(reduction="sum")),
    "fused-member-ce-label-smoothing": dict(impl="fused", member="ce_smoothed"),
    "fused-all-ignored": dict(impl="fused", labels="all_ignored"),
    "bf16-dft-sum-bias": dict(dtype=torch.bfloat16, opts=dict(reduction="sum", softcap=3.0)),
}
# the members that read more than the five partials (suite vocab_parallel_members, 2 ranks):
# eaft's top-k entropy (k = 20 over shards of 19 + 18 columns: no shard holds k logits, so the
# gathered top k's are padded; and test_loss_family's member at V = 129, shards 65 + 64), asft
# with the reference head sharded like the policy's (its reference partials merged; "none" keeps
# the merged lse_q for the backward), on the torch row ops, the Triton row kernels and the fused
# kernels
VOCAB_PARALLEL_MEMBERS = {
    "eaft-topk-wider-than-shards": dict(opts=dict(loss_type="eaft", eaft_topk=20, softcap=3.0)),
    "eaft-topk-none-axolotl": dict(
        opts=dict(loss_type="eaft", eaft_topk=7, eaft_normalizer=1.0, reduction="none")
    ),
    "member-eaft-topk": dict(member="eaft_topk"),
    "fused-member-eaft-topk-sum": dict(
        impl="fused", member="eaft_topk", opts=dict(reduction="sum")
    ),
    "member-asft": dict(member="asft"),
    "member-asft-none": dict(member="asft", opts=dict(reduction="none")),
    "asft-sum-replicate-ref-hidden": dict(
        member="asft", opts=dict(reduction="sum"), ref_hidden="replicate"
    ),
    "triton-rows-member-asft": dict(impl="chunked", member="asft"),
    "fused-member-asft": dict(impl="fused", member="asft"),
    "fused-member-asft-none": dict(impl="fused", member="asft", opts=dict(reduction="none")),
    "triton-rows-member-asft-none": dict(
        impl="chunked", member="asft", opts=dict(reduction="none")
    ),
}
# fused_linear_logprobs on the vocab-parallel head against float64 autograd of the naive
# log_softmax + gather + entropy (random upstream gradients on both outputs)
LOGPROBS = {
    "logprobs-scale-softcap": dict(opts=dict(logit_scale=1.25, softcap=3.0)),
    "logprobs-no-entropy": dict(opts=dict(return_entropy=False)),
    "fused-logprobs": dict(impl="fused"),
}
BAD_REFERENCE = [
    "bad-ref-weight-replicate",
    "bad-ref-weight-plain",
    "bad-ref-weight-sharded-policy-plain",
]
# 3 ranks: uneven shards of 13 + 13 + 11, each path and the members that use the whole V
VOCAB_PARALLEL_3 = [
    "dft-mean-bias-softcap",
    "ce-none-ignore-index",
    "member-eaft",
    "member-ce-label-smoothing",
    "labels-in-first-shard-only",
    "triton-rows-dft-mean",
    "fused-dft-mean-bias-softcap",
    "double-backward-refused",
]
BAD_INPUTS = [
    "bad-replicate-weight",
    "bad-shard1-weight",
    "bad-2d-mesh",
    "bad-sharded-hidden",
    "bad-hidden-other-mesh",
    "bad-plain-bias",
    "bad-dtensor-labels",
    "bad-empty-shard",
]
MODELS = [
    "ddp-per-rank-mean",
    "ddp-num-items-in-batch",
    "fsdp-lm-head-unit",
    "fsdp-tied-embedding-and-lm-head-unit",
    "fsdp-tied-root-unit",
    "fsdp-sharded-weight-refused",
    "fsdp-shard-then-patch",
    "fsdp-tied-root-shard-then-patch",
    "fsdp-shard-then-patch-verify-refuses",
    "fsdp-accelerate-tail-group",
    "fsdp-accelerate-tail-group-tied",
    "tp-parallelize-then-patch",
    "tp-parallelize-then-patch-verify-false",
    "tp-patch-then-parallelize",
    "tp-parallelize-then-patch-verify-refuses",
    "tp-local-output-verify-refused",
]
SUITES = {
    "vocab_parallel_2": list(VOCAB_PARALLEL) + BAD_INPUTS,
    "vocab_parallel_3": VOCAB_PARALLEL_3,
    "vocab_parallel_members": list(VOCAB_PARALLEL_MEMBERS) + list(LOGPROBS) + BAD_REFERENCE,
    "models": MODELS,
}


# ---------------------------------------------------------------------------------------------
# Process entry


def run_suite(rank: int, world: int, suite: str, store: str, out_dir: str) -> None:
    """One rank: gloo through a file store (no port to pick), every case of the suite."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    from fused_dft.kernels import common

    common.POISON_OUTPUTS = True  # as in tests/conftest.py: an unwritten output fails
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    results = {}
    try:
        for case in SUITES[suite]:
            skip = triton_skip_reason(case)
            if skip is not None:
                results[case] = SKIPPED + skip
                continue
            try:
                torch.manual_seed(0)
                CASE_RUNNERS[_kind(case)](case, world)
                results[case] = None
            except AssertionError:
                results[case] = traceback.format_exc()
            except Exception:
                # the ranks may now disagree on the collectives still to come: stop here
                results[case] = traceback.format_exc()
                break
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


# a rank's result for a case it did not run, followed by the reason
SKIPPED = "SKIPPED: "


def triton_skip_reason(case: str) -> str | None:
    """Why this rank cannot run a case's Triton kernels, or None. The gloo ranks compute on CPU
    tensors: Triton runs there only through its interpreter, which a CUDA test run (the test
    device is CUDA: tests/conftest.py leaves TRITON_INTERPRET unset) does not turn on."""
    from fused_dft.runtime import can_run_triton

    spec = {**VOCAB_PARALLEL, **VOCAB_PARALLEL_MEMBERS, **LOGPROBS}.get(case)
    if spec is None or spec.get("impl", "auto") == "auto" or can_run_triton(torch.device("cpu")):
        return None
    return (
        f"impl={spec['impl']!r} on the gloo ranks' CPU tensors needs Triton's interpreter "
        "(TRITON_INTERPRET=1), off in a CUDA test run"
    )


def _kind(case: str) -> str:
    if case in BAD_REFERENCE:
        return "bad_reference"
    if case in LOGPROBS:
        return "logprobs"
    if case.startswith("bad-"):
        return "bad"
    if case == "double-backward-refused":
        return "double_backward"
    return "model" if case in MODELS else "vocab_parallel"


# ---------------------------------------------------------------------------------------------
# Vocab-parallel loss against one process


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _case_inputs(spec: dict):
    """float64 (hidden, weight, labels, bias, opts), the same on every rank (seeded)."""
    from .helpers import make_inputs
    from .test_loss_family import member_inputs

    if "member" in spec:
        hidden, weight, labels, bias, opts = member_inputs(spec["member"], torch.float64)
        opts = {**opts, **spec.get("opts", {})}
    else:
        opts = {"ignore_index": IGNORE, **spec.get("opts", {})}
        lead = spec.get("lead")
        hidden, weight, labels, bias = make_inputs(
            N, D, V, torch.float64, bias=spec.get("bias", True), lead=lead,
            ignore_index=opts["ignore_index"], scale=2.0,
        )  # fmt: skip
    vocab = weight.shape[0]
    if spec.get("labels") == "all_ignored":
        labels = torch.full_like(labels, opts["ignore_index"])
    elif spec.get("labels") == "first_shard":  # the other ranks' shards hold no label
        valid = labels != opts["ignore_index"]
        labels = torch.where(valid, labels % (vocab // 4), labels)
    return hidden, weight, labels, bias, opts


def _expected(hidden, weight, labels, bias, upstream, opts):
    """One process, float64: test_loss_family's closed-form oracle, plus the accuracy."""
    from .test_loss_family import oracle

    h2, y1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    loss, grads, logp, stats = oracle(h2, weight, y1, bias, upstream.reshape(-1), **opts)
    z = h2 @ weight.t() + (bias if bias is not None else 0.0)
    z = z * opts.get("logit_scale", 1.0)
    if opts.get("softcap") is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    valid = y1 != opts["ignore_index"]
    z_y = z.gather(1, torch.where(valid, y1, 0)[:, None]).squeeze(1)
    stats["accuracy"] = ((z_y >= z.amax(1)) & valid).sum() / max(int(valid.sum()), 1)
    stats["num_tokens"] = valid.sum()
    if opts.get("reduction") == "none":
        loss = loss.reshape(labels.shape)
    return loss, grads, logp.reshape(labels.shape), stats


def run_vocab_parallel(case: str, world: int) -> None:
    import fused_dft
    from fused_dft import parallel
    from fused_dft.backends import chunked, fused
    from fused_dft.kernels import configs, rows

    from .helpers import SMALL_FUSED

    spec = {**VOCAB_PARALLEL, **VOCAB_PARALLEL_MEMBERS}[case]
    impl = spec.get("impl", "auto")
    dtype = spec.get("dtype", torch.float64 if impl == "auto" else torch.float32)
    hidden, weight, labels, bias, opts = _case_inputs(spec)
    reduction = opts.get("reduction", "mean")
    upstream = torch.randn(labels.shape if reduction == "none" else (), dtype=torch.float64)
    loss_t, grads_t, logp_t, stats_t = _expected(hidden, weight, labels, bias, upstream, opts)
    check = _checker(dtype, hidden, weight, labels, bias, upstream, opts)

    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    w = distribute_tensor(weight.to(dtype), mesh, [Shard(0)])
    w.requires_grad_(spec.get("hidden") != "frozen_weight")
    b = None if bias is None else distribute_tensor(bias.to(dtype), mesh, [Shard(0)])
    if b is not None:
        b.requires_grad_(True)
    h = hidden.to(dtype)
    if spec.get("hidden") == "replicate":
        h = distribute_tensor(h, mesh, [Replicate()])
    h.requires_grad_(True)
    layout = parallel.vocab_parallel_layout(h, w, b, labels)
    call_opts = dict(opts)
    if "ref_weight" in opts:  # asft: the reference head sharded like the policy's
        ref_h = opts["ref_hidden"].to(dtype)
        if spec.get("ref_hidden") == "replicate":
            ref_h = distribute_tensor(ref_h, mesh, [Replicate()])
        call_opts["ref_hidden"] = ref_h
        for name in ("ref_weight", "ref_bias"):
            call_opts[name] = distribute_tensor(opts[name].to(dtype), mesh, [Shard(0)])

    # spy: every logits chunk is (at most CHUNK tokens) x (this rank's shard), never N x V
    widths = []
    logits = chunked._logits

    def spy(h_c, w_c, b_c):
        widths.append(tuple(w_c.shape))
        return logits(h_c, w_c, b_c)

    chunked._logits = spy
    saved = (rows.DEFAULT_BLOCK_V, fused.TOKEN_CHUNK, fused.DZ_SCRATCH_BYTES)
    # small tiles: the ragged shards span several tiles and splits of the kernels, and the fused
    # backward several token and vocab chunks
    rows.DEFAULT_BLOCK_V, fused.TOKEN_CHUNK, fused.DZ_SCRATCH_BYTES = 16, 16, 16 * 4 * 48
    os.environ[configs.ENV_CONFIG] = SMALL_FUSED.spec
    try:
        loss, stats, logprobs = fused_dft.fused_linear_dft_loss(
            h, w, labels, b, impl=impl, return_stats=True, return_logprobs=True,
            chunk_size=CHUNK, **call_opts,
        )  # fmt: skip
        inputs = [t for t in (h, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    finally:
        chunked._logits = logits
        rows.DEFAULT_BLOCK_V, fused.TOKEN_CHUNK, fused.DZ_SCRATCH_BYTES = saved
        os.environ.pop(configs.ENV_CONFIG)

    where = f"rank {layout.rank}"
    check("loss", loss, loss_t, where)
    check("logprobs", logprobs, logp_t, where)
    for name in ("ce", "entropy", "lse", "accuracy"):
        check(name, getattr(stats, name), stats_t[name], where)
    assert int(stats.num_tokens) == int(stats_t["num_tokens"])

    grads = dict(zip([id(t) for t in inputs], grads))
    dh = grads[id(h)]
    if spec.get("hidden") == "replicate":
        assert tuple(dh.placements) == (Replicate(),), f"{where}: dh placements {dh.placements}"
        dh = dh.to_local()
    check("dh", dh.reshape(grads_t[0].shape), grads_t[0], where)
    own = slice(layout.offset, layout.offset + layout.local_vocab)
    for name, t, g_t in (("dW", w, grads_t[1]), ("db", b, grads_t[-1] if b is not None else None)):
        if t is None or not t.requires_grad:
            continue
        g = grads[id(t)]
        assert tuple(g.placements) == (Shard(0),), f"{where}: {name} placements {g.placements}"
        assert tuple(g.shape) == tuple(t.shape) and g.dtype == t.dtype
        check(name, g.to_local(), g_t[own], where, own)
    if impl != "fused" and bool((labels != opts["ignore_index"]).any()):
        shard_shape = (layout.local_vocab, hidden.shape[-1])
        assert widths and all(s == shard_shape for s in widths), widths


def _checker(dtype, hidden, weight, labels, bias, upstream, opts):
    """check(name, actual, float64 truth, where, rows=None): fp64 / fp32 within fixed
    tolerances; bf16 no worse than twice plain torch's own error in bf16 (fused_dft's reference,
    one process) plus 2^-8 of the largest value. Stats are fp32 whatever the inputs."""
    from .helpers import assert_close, max_err

    grads = ("dh", "dW", "db")
    stats = ("ce", "entropy", "lse", "accuracy")
    if dtype != torch.bfloat16:
        tight = dtype == torch.float64

        def check(name, actual, expected, where, rows=None):
            if name in stats:
                tol = dict(rtol=1e-5)
            elif name in grads:
                tol = dict(rtol=1e-9, atol_frac=1e-12) if tight else dict(rtol=1e-4, atol_frac=1e-5)
            else:
                tol = dict(rtol=1e-9, atol_frac=1e-12) if tight else dict(rtol=1e-5, atol_frac=1e-6)
            assert_close(actual, expected, f"{where} {name} {rows or ''}", **tol)

        return check

    import fused_dft

    leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
    loss, stat, logprobs = fused_dft.fused_linear_dft_loss(
        leaves[0], leaves[1], labels, leaves[2] if bias is not None else None,
        impl="reference", return_stats=True, return_logprobs=True, **opts,
    )  # fmt: skip
    ref = dict(zip(grads, torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))))
    ref.update(loss=loss, logprobs=logprobs, **{k: getattr(stat, k) for k in stats})

    def check(name, actual, expected, where, rows=None):
        torch_value = ref[name] if rows is None else ref[name][rows]
        err, err_torch = max_err(actual, expected), max_err(torch_value, expected)
        bound = 2 * err_torch + 2**-8 * float(expected.abs().max())
        assert err <= bound, f"{where} {name}: error {err:.3g}, torch's in bf16 {err_torch:.3g}"

    return check


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error on every rank, before any compute


def run_bad_input(case: str, world: int) -> None:
    import pytest
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fused_dft
    from fused_dft import parallel
    from fused_dft.backends import BACKENDS

    mesh = _mesh(world)
    hidden = torch.randn(N, D)
    weight, labels, bias = torch.randn(V, D), torch.randint(0, V, (N,)), None
    w_shard = distribute_tensor(weight, mesh, [Shard(0)])
    if case == "bad-replicate-weight":
        weight, found = distribute_tensor(weight, mesh, [Replicate()]), "Replicate()"
    elif case == "bad-shard1-weight":
        weight, found = distribute_tensor(weight, mesh, [Shard(1)]), "Shard(dim=1)"
    elif case == "bad-2d-mesh":
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        weight, found = distribute_tensor(weight, mesh2, [Replicate(), Shard(0)]), "2-D mesh"
    elif case == "bad-sharded-hidden":
        hidden, weight = distribute_tensor(hidden, mesh, [Shard(0)]), w_shard
        found = "hidden has placements (Shard(dim=0),)"
    elif case == "bad-hidden-other-mesh":
        mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("a", "b"))
        hidden, weight = distribute_tensor(hidden, mesh2["b"], [Replicate()]), w_shard
        found = "hidden is on mesh"
    elif case == "bad-plain-bias":
        weight, bias, found = w_shard, torch.randn(V), "bias is a plain tensor"
    elif case == "bad-dtensor-labels":
        weight, found = w_shard, "labels is a DTensor"
        labels = distribute_tensor(labels, mesh, [Replicate()])
    else:  # bad-empty-shard: 1 vocabulary row per rank leaves the last rank(s) empty
        weight, labels = distribute_tensor(torch.randn(world - 1, D), mesh, [Shard(0)]), labels * 0
        found = "holds none"

    def no_compute(*args, **kwargs):
        raise AssertionError("the loss started computing on bad input")

    saved = (parallel.vocab_parallel_loss, dict(BACKENDS))
    parallel.vocab_parallel_loss = no_compute
    for name, backend in saved[1].items():
        BACKENDS[name] = dataclasses.replace(backend, forward=no_compute)
    try:
        with pytest.raises(ValueError) as info:
            fused_dft.fused_linear_dft_loss(hidden, weight, labels, bias)
    finally:
        parallel.vocab_parallel_loss = saved[0]
        BACKENDS.update(saved[1])
    message = str(info.value)
    assert found in message, message
    assert "supported" in message or "use fewer ranks" in message, message


# ---------------------------------------------------------------------------------------------
# Training set-ups of a patched tiny Llama against one process


def _tiny_llama(tied: bool = False, doubled: bool = False):
    """The tiny Llama of these cases; `doubled`: as a family the patch does not know (its forward
    doubles the logits after lm_head), which verify=True must refuse."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=301, initializer_range=0.2, pad_token_id=0,
        tie_word_embeddings=tied,
    )  # fmt: skip
    if doubled:
        model = _doubled_logits_llama()._from_config(config, attn_implementation="eager")
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().train()


def _doubled_logits_llama():
    import transformers

    class DoubledLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    return DoubledLogits


def _batch(seed: int):
    """Ragged: right padding and a masked prompt; shifted labels have ignored positions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 301, (2, 9), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, -3 - seed % 3 :] = 0
    input_ids[mask == 0] = 0
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    labels[0, : 2 + seed % 3] = IGNORE
    return {"input_ids": input_ids, "attention_mask": mask}, labels


def _dft_from_logits(logits, labels, num_items=None):
    """The one-process oracle: DFT from the stock model's full logits, next-token labels."""
    y = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    z = logits.float().reshape(-1, logits.shape[-1])
    valid = y != IGNORE
    logp = z[valid].log_softmax(-1).gather(-1, y[valid, None]).squeeze(-1)
    return (-logp.detach().exp() * logp).sum() / (valid.sum() if num_items is None else num_items)


def _one_process_grads(batches, tied=False, num_items=None):
    """Gradients of the stock model: mean over ranks of each rank's loss, or with num_items the
    sum over every token / num_items (one process over the concatenated batch)."""
    stock = _tiny_llama(tied)
    if num_items is None:
        for inputs, labels in batches:
            (_dft_from_logits(stock(**inputs).logits, labels) / len(batches)).backward()
    else:
        inputs = {k: torch.cat([b[0][k] for b in batches]) for k in batches[0][0]}
        labels = torch.cat([b[1] for b in batches])
        _dft_from_logits(stock(**inputs).logits, labels, num_items).backward()
    return {name: p.grad for name, p in stock.named_parameters()}


def _assert_grads(model, expected, where, full=lambda g: g):
    checked = 0
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        assert p.grad is not None, f"{where}: {name} has no gradient"
        torch.testing.assert_close(
            full(p.grad), expected[name], rtol=1e-4, atol=1e-6, msg=f"{where}: {name}"
        )
        checked += 1
    assert checked == len(expected), (checked, len(expected))


def run_model(case: str, world: int) -> None:
    import torch.distributed as dist

    import fused_dft

    rank = dist.get_rank()
    batches = [_batch(r + 1) for r in range(world)]
    if case.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(fused_dft.patch_model(_tiny_llama()))
        inputs, labels = batches[rank]
        if case == "ddp-per-rank-mean":
            model(**inputs, labels=labels).loss.backward()
            expected = _one_process_grads(batches)
        else:  # HF Trainer: num_items_in_batch counts every rank's tokens, loss times world
            num_items = sum(int((b[1][:, 1:] != IGNORE).sum()) for b in batches)
            out = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(num_items))
            (out.loss * world).backward()
            expected = _one_process_grads(batches, num_items=num_items)
        _assert_grads(model, expected, f"rank {rank} {case}")
    elif case.startswith("fsdp"):
        run_fsdp(case, world, rank, batches)
    else:
        run_tensor_parallel(case, world, rank, batches)


def run_fsdp(case: str, world: int, rank: int, batches) -> None:
    """Patched, then sharded (fully_shard), or sharded, then patched with verify=True."""
    import pytest
    from torch.distributed.fsdp import fully_shard

    import fused_dft
    from fused_dft.hf.heads import _head_params
    from fused_dft.parallel import is_dtensor

    mesh = _mesh(world)
    tied = "tied" in case
    shard_first = "shard-then-patch" in case
    model = _tiny_llama(tied, doubled=case.endswith("refuses"))
    if not shard_first:
        fused_dft.patch_model(model)
    if case in ("fsdp-lm-head-unit", "fsdp-sharded-weight-refused") or (shard_first and not tied):
        fully_shard(model.lm_head, mesh=mesh)
    elif case == "fsdp-tied-embedding-and-lm-head-unit":
        fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh)
    elif case.startswith("fsdp-accelerate-tail-group"):
        # accelerate 1.16's fsdp2_prepare_model: each decoder layer, the embedding (untied), then
        # one group of the final norm + lm_head (+ the tied embedding) with
        # reshard_after_forward=False, then the root
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        if not tied:
            fully_shard(model.model.embed_tokens, mesh=mesh)
        tail = [model.model.norm] + ([model.model.embed_tokens] if tied else []) + [model.lm_head]
        fully_shard(tail, mesh=mesh, reshard_after_forward=False)
    if case == "fsdp-sharded-weight-refused":
        # outside FSDP's forward the weight is the sharded DTensor: never taken for vocab-parallel
        with pytest.raises(RuntimeError, match="still sharded by the FSDP unit"):
            _head_params(model, model.lm_head)
        return
    if not case.startswith("fsdp-accelerate-tail-group"):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if shard_first:
        # verify=True runs the stock forward and the patched one on the sharded model (through
        # the root unit, as training does) and leaves every parameter sharded
        if case.endswith("refuses"):
            with pytest.raises(ValueError, match="logits the fused loss would use .*DoubledLogits"):
                fused_dft.patch_model(model)
            assert not fused_dft.is_patched(model)
        else:
            fused_dft.patch_model(model)
        assert all(is_dtensor(p) for p in model.parameters())
        if case.endswith("refuses"):
            return
    inputs, labels = batches[rank]
    model(**inputs, labels=labels).loss.backward()
    expected = _one_process_grads(batches, tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        expected.pop("lm_head.weight", None)
    _assert_grads(model, expected, f"rank {rank} {case}", full=lambda g: g.full_tensor())


def run_tensor_parallel(case: str, world: int, rank: int, batches) -> None:
    """A ColwiseParallel lm_head (vocab-parallel loss): patched, then parallelized, or
    parallelized, then patched with verify=True (the stock forward under loss_parallel, compared
    on each rank's shard) or verify=False."""
    import pytest
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fused_dft
    from fused_dft import parallel

    mesh = _mesh(world)
    plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    model = _tiny_llama(doubled=case.endswith("refuses"))
    if case == "tp-patch-then-parallelize":
        parallelize_module(fused_dft.patch_model(model), mesh, plan)
    elif case == "tp-local-output-verify-refused":
        # ColwiseParallel's default hands the stock loss this rank's logits as a plain tensor:
        # the stock forward cannot compute its loss, so verify says what plan it needs
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
        with pytest.raises(ValueError, match=r"use_local_output=False.*verify=False"):
            fused_dft.patch_model(model)
        assert not fused_dft.is_patched(model)
        return
    else:
        parallelize_module(model, mesh, plan)
        if case.endswith("refuses"):
            with pytest.raises(ValueError, match="logits the fused loss would use .*DoubledLogits"):
                fused_dft.patch_model(model)
            assert not fused_dft.is_patched(model)
            return
        fused_dft.patch_model(model, verify=not case.endswith("verify-false"))
    head_calls, vp_calls = [], []
    model.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    vocab_parallel_loss = parallel.vocab_parallel_loss

    def spy(*args, **kwargs):
        vp_calls.append(1)
        return vocab_parallel_loss(*args, **kwargs)

    parallel.vocab_parallel_loss = spy
    try:
        inputs, labels = batches[0]  # tensor parallel: the same batch on every rank
        out = model(**inputs, labels=labels)
        out.loss.backward()
    finally:
        parallel.vocab_parallel_loss = vocab_parallel_loss
    assert vp_calls == [1] and head_calls == [], (vp_calls, head_calls)  # no logits, no gather
    assert out.logits is None
    assert tuple(model.lm_head.weight.grad.placements) == (Shard(0),)
    expected = _one_process_grads(batches[:1])
    full = lambda g: g.full_tensor() if parallel.is_dtensor(g) else g  # noqa: E731
    _assert_grads(model, expected, f"rank {rank} {case}", full=full)


def run_double_backward(case: str, world: int) -> None:
    """create_graph=True through the vocab-parallel Function: the one clear error on every rank
    (raised before dh's all-reduce, so the ranks stay in step), for the precomputed (mean) and
    the recomputing ("none") backward, chunked and fused."""
    import pytest
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_dft

    mesh = _mesh(world)
    weight = distribute_tensor(torch.randn(V, D), mesh, [Shard(0)]).requires_grad_(True)
    labels = torch.randint(0, V, (N,))
    for impl in ("auto", "fused"):
        for reduction in ("mean", "none"):
            hidden = torch.randn(N, D, requires_grad=True)
            loss = fused_dft.fused_linear_dft_loss(
                hidden, weight, labels, impl=impl, reduction=reduction
            )
            with pytest.raises(RuntimeError, match=r"create_graph=True.*impl='reference'"):
                torch.autograd.grad(loss.sum(), hidden, create_graph=True)


def run_vocab_parallel_logprobs(case: str, world: int) -> None:
    """fused_linear_logprobs with a Shard(0) head: log p_y, H and the gradients of
    sum(g_l log p_y + g_H H) against float64 autograd of the naive op on the full logits."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_dft
    from fused_dft import parallel

    from .helpers import assert_close, make_inputs
    from .test_logprobs import IGNORE as LP_IGNORE
    from .test_logprobs import naive

    spec = LOGPROBS[case]
    impl = spec.get("impl", "auto")
    dtype = torch.float64 if impl == "auto" else torch.float32
    opts = dict(spec.get("opts", {}))
    with_entropy = opts.pop("return_entropy", True)
    hidden, weight, labels, bias = make_inputs(
        N, D, V, torch.float64, bias=True, ignore_index=LP_IGNORE, scale=2.0
    )
    g_logp, g_entropy = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp_t, entropy_t = naive(*leaves[:2], labels, leaves[2], **opts)
    total = (logp_t * g_logp).sum() + (entropy_t * g_entropy).sum() * with_entropy
    grads_t = torch.autograd.grad(total, leaves)

    mesh = _mesh(world)
    h = hidden.to(dtype).requires_grad_(True)
    w = distribute_tensor(weight.to(dtype), mesh, [Shard(0)]).requires_grad_(True)
    b = distribute_tensor(bias.to(dtype), mesh, [Shard(0)]).requires_grad_(True)
    layout = parallel.vocab_parallel_layout(h, w, b, labels)
    out = fused_dft.fused_linear_logprobs(
        h, w, labels, b, impl=impl, chunk_size=CHUNK, ignore_index=LP_IGNORE,
        return_entropy=with_entropy, **opts,
    )  # fmt: skip
    logp, entropy = out if with_entropy else (out, None)
    total = (logp * g_logp.to(logp.dtype)).sum()
    if with_entropy:
        total = total + (entropy * g_entropy.to(entropy.dtype)).sum()
    dh, dw, db = torch.autograd.grad(total, [h, w, b])

    where = f"rank {layout.rank}"
    tight = dtype == torch.float64
    tol = dict(rtol=1e-9, atol_frac=1e-12) if tight else dict(rtol=1e-5, atol_frac=1e-6)
    grad_tol = dict(rtol=1e-9, atol_frac=1e-12) if tight else dict(rtol=1e-4, atol_frac=1e-5)
    assert_close(logp, logp_t, f"{where} log p_y", **tol)
    if with_entropy:
        assert_close(entropy, entropy_t, f"{where} entropy", **tol)
    own = slice(layout.offset, layout.offset + layout.local_vocab)
    assert_close(dh, grads_t[0], f"{where} dh", **grad_tol)
    for name, g, g_t in (("dW", dw, grads_t[1]), ("db", db, grads_t[2])):
        assert tuple(g.placements) == (Shard(0),), f"{where}: {name} placements {g.placements}"
        assert_close(g.to_local(), g_t[own], f"{where} {name}", **grad_tol)


def run_bad_reference(case: str, world: int) -> None:
    """asft's reference head sharded differently from the policy's: a ValueError naming
    ref_weight on every rank, before any compute."""
    import pytest
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fused_dft
    from fused_dft import parallel
    from fused_dft.backends import BACKENDS

    mesh = _mesh(world)
    hidden, ref_hidden = torch.randn(N, D), torch.randn(N, D)
    weight, ref_weight = torch.randn(V, D), torch.randn(V, D)
    labels = torch.randint(0, V, (N,))
    w_shard = distribute_tensor(weight, mesh, [Shard(0)])
    if case == "bad-ref-weight-replicate":
        weight, found = w_shard, "ref_weight has placements (Replicate(),)"
        ref_weight = distribute_tensor(ref_weight, mesh, [Replicate()])
    elif case == "bad-ref-weight-plain":
        weight, found = w_shard, "ref_weight is a plain tensor while weight is vocab-parallel"
    else:  # bad-ref-weight-sharded-policy-plain
        ref_weight = distribute_tensor(ref_weight, mesh, [Shard(0)])
        found = "ref_weight is a DTensor with placements (Shard(dim=0),)"

    def no_compute(*args, **kwargs):
        raise AssertionError("the loss started computing on bad input")

    saved = (parallel.VocabParallelFunction.apply, dict(BACKENDS))
    parallel.VocabParallelFunction.apply = no_compute
    for name, backend in saved[1].items():
        BACKENDS[name] = dataclasses.replace(backend, forward=no_compute)
    try:
        with pytest.raises(ValueError) as info:
            fused_dft.fused_linear_dft_loss(
                hidden, weight, labels, loss_type="asft", ref_hidden=ref_hidden,
                ref_weight=ref_weight,
            )  # fmt: skip
    finally:
        parallel.VocabParallelFunction.apply = saved[0]
        BACKENDS.update(saved[1])
    message = str(info.value)
    assert found in message, message
    assert "ref_weight" in message or "asft" in message, message


CASE_RUNNERS = {
    "vocab_parallel": run_vocab_parallel,
    "logprobs": run_vocab_parallel_logprobs,
    "bad_reference": run_bad_reference,
    "bad": run_bad_input,
    "model": run_model,
    "double_backward": run_double_backward,
}
