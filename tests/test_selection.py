"""How rows are selected (selection.exact_selection), apart from how values are checked (validate=).

No GPU here: "CUDA, not capturing" and "capturing" are stood in for by monkeypatching the one
predicate the selection asks (selection.host_read_allowed), and host_read_forbidden is checked
against stand-ins for torch.cuda's capture and sync-debug queries.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fused_dft
from fused_dft import selection
from fused_dft.options import LossOptions

from .helpers import assert_close, make_inputs, replace_backend_forwards, use_impl

# ragged on purpose; 40% ignored so the two selections differ by many rows
N, D, V = 37, 40, 129


def _stand_in(monkeypatch, cuda_not_capturing: bool) -> None:
    monkeypatch.setattr(selection, "host_read_allowed", lambda device: cuda_not_capturing)


@pytest.mark.parametrize("validate", ["sync", "device", "off"])
@pytest.mark.parametrize("cuda_not_capturing", [True, False])
def test_selection_follows_the_host_read_predicate(validate, cuda_not_capturing, monkeypatch):
    _stand_in(monkeypatch, cuda_not_capturing)
    labels = torch.tensor([5, -100, 7, -100, -100, 2, 400, -100])  # 400: a bad label (V = 129)
    opts = LossOptions(validate=validate)
    rows = selection.select_rows(labels, opts, None, None, torch.float32, V)
    exact = validate == "sync" or cuda_not_capturing
    if exact:  # the non-ignored rows only, in order, every one a token
        assert rows.idx.tolist() == [0, 2, 5, 6]
        assert rows.valid is None
    else:  # every row, the non-ignored first (stable), the count on the device
        assert rows.idx.tolist() == [0, 2, 5, 6, 1, 3, 4, 7]
        assert rows.valid.tolist() == [True] * 4 + [False] * 4
    assert int(rows.num_valid) == 4
    # the bad label is never read either way; "device" marks it for NaN, the others do not
    assert rows.labels[3].item() == -1
    assert (rows.bad is not None) == (validate == "device")
    if rows.bad is not None:
        assert rows.bad.tolist()[:4] == [False, False, False, True]


# the loss and gradients are those of the reference (logits materialized) whichever selection
# runs, and the backend is handed exactly the non-ignored rows when the host read is allowed
@pytest.mark.parametrize("case", ["chunked", "fused"])
@pytest.mark.parametrize("cuda_not_capturing", [True, False])
def test_trimmed_rows_reach_the_backend_and_match_the_reference(
    case, cuda_not_capturing, monkeypatch
):
    impl = use_impl(case, monkeypatch)
    _stand_in(monkeypatch, cuda_not_capturing)
    seen = []

    def wrap(forward):
        def spy(hidden, weight, bias, rows, *args, **kwargs):
            seen.append(rows.n)
            return forward(hidden, weight, bias, rows, *args, **kwargs)

        return spy

    replace_backend_forwards(monkeypatch, wrap)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True, ignore_frac=0.4)
    tokens = int((labels != -100).sum())
    assert 0 < tokens < N
    results = {}
    for which in (impl, "reference"):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        loss = fused_dft.fused_linear_dft_loss(
            h, w, labels, b, impl=which, validate="device", chunk_size=8, loss_type="eaft"
        )
        results[which] = (loss, torch.autograd.grad(loss, [h, w, b]))
    assert seen[0] == (tokens if cuda_not_capturing else N)
    loss, grads = results[impl]
    ref_loss, ref_grads = results["reference"]
    assert_close(loss, ref_loss, "loss", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_ref in zip(("dh", "dW", "db"), grads, ref_grads):
        assert_close(g, g_ref, name, rtol=1e-4, atol_frac=1e-5)


# validate="device" keeps its meaning for bad labels on the trimmed path: NaN, never a raise
def test_bad_label_is_nan_on_the_trimmed_path(monkeypatch):
    _stand_in(monkeypatch, True)
    hidden, weight, labels, _ = make_inputs(N, D, V)
    labels[3] = V + 5
    loss = fused_dft.fused_linear_dft_loss(hidden, weight, labels, validate="device")
    assert torch.isnan(loss), f"a bad label gave the plausible loss {float(loss)}"


@pytest.mark.parametrize(
    "capturing, sync_debug, forbidden",
    [(False, 0, False), (True, 0, True), (False, 2, True), (False, 1, True)],
)
def test_host_read_forbidden_while_capturing_or_sync_debugging(
    capturing, sync_debug, forbidden, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: sync_debug)
    cuda = torch.device("cuda", 0)
    assert selection.host_read_forbidden(cuda) is forbidden
    assert selection.host_read_allowed(cuda) is not forbidden
    # never on the CPU: validate="device" / "off" there keep the static path
    assert selection.host_read_allowed(torch.device("cpu")) is False
    assert selection.exact_selection(LossOptions(validate="sync"), cuda) is True
    assert selection.exact_selection(LossOptions(validate="device"), cuda) is not forbidden
