"""A model patched and pickled by fused_dft 0.1.0 still loads, patched, and computes the same loss.

tests/data/patched_llama_fused_dft_0.1.0.pkl is a fixed artefact: a tiny Llama (vocab 97, hidden
16, 1 layer, 2 heads, 1 kv head, intermediate 32, untied, eager attention, fp32, train mode)
patched by release 0.1.0 with `patch_model(model, loss_type="power", power_q=0.5)` and pickled with
`pickle.dumps(model, protocol=4)`. Its loss on the batch below was then 1.7999727725982666. The
pickle names four objects of fused_dft by their 0.1.0 path, `fused_dft.transformers.<name>`; the
compatibility module fused_dft/transformers.py keeps them, as the objects fused_dft.hf uses.
"""

from __future__ import annotations

import copy
import hashlib
import io
import pathlib
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
import fused_dft.transformers as compat  # noqa: E402
from fused_dft import hf  # noqa: E402
from fused_dft.hf.call import _capture_pre_hook  # noqa: E402
from fused_dft.hf.lifecycle import _new_patched  # noqa: E402
from fused_dft.hf.model import LogitTransform  # noqa: E402
from fused_dft.hf.state import PatchState  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "patched_llama_fused_dft_0.1.0.pkl"
SHA256 = "8a2038d381409585642a9bacc12ae646a9c92606821e49f7a95c446898b5a9f1"
LOSS_0_1_0 = 1.7999727725982666
OPTIONS = dict(loss_type="power", power_q=0.5)
# what the 0.1.0 pickle names in fused_dft.transformers, and where that code lives now
PICKLED = {
    "_new_patched": _new_patched,
    "_capture_pre_hook": _capture_pre_hook,
    "PatchState": PatchState,
    "LogitTransform": LogitTransform,
}


def pickled_bytes() -> bytes:
    data = DATA.read_bytes()
    # the file is what 0.1.0 wrote: regenerating it with the current code would test nothing
    assert hashlib.sha256(data).hexdigest() == SHA256
    return data


def batch() -> torch.Tensor:
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def test_compat_module_keeps_the_pickled_and_public_names():
    found = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.append((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(pickled_bytes())).load()
    ours = {(m, n) for m, n in found if m.split(".")[0] == "fused_dft"}
    assert ours == {("fused_dft.transformers", name) for name in PICKLED}
    for name, obj in PICKLED.items():
        assert getattr(compat, name) is obj, name
    for name in hf.__all__:
        assert getattr(compat, name) is getattr(hf, name), name


def test_0_1_0_pickle_loads_patched_with_the_same_loss():
    data = pickled_bytes()
    ids = batch()
    loaded = pickle.loads(data)
    assert fused_dft.is_patched(loaded)
    out = loaded(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, torch.tensor(LOSS_0_1_0), rtol=1e-5, atol=0)

    # the same model unpatched and patched again by this release: the same loss, exactly
    repatched = pickle.loads(data)
    fused_dft.unpatch_model(repatched)
    fused_dft.patch_model(repatched, **OPTIONS)
    torch.testing.assert_close(repatched(input_ids=ids, labels=ids).loss, out.loss, rtol=0, atol=0)

    assert fused_dft.unpatch_model(loaded) is loaded
    assert type(loaded) is transformers.LlamaForCausalLM and not fused_dft.is_patched(loaded)


# A 0.1.0 state names no hooked head: the patch finds its hook by the slot on the lm_head, and
# follows an lm_head replaced after loading (here by a copy of the old one, which carries a copy
# of its hook: the new head ends with exactly one), and unpatch_model cleans the new head.
def test_0_1_0_pickle_follows_a_replaced_lm_head():
    loaded = pickle.loads(pickled_bytes())
    assert loaded.__dict__[hf.STATE_ATTR].head is None
    ids = batch()
    loaded(input_ids=ids, labels=ids)  # adopts the hooked head
    old_head = loaded.lm_head
    new_head = copy.deepcopy(old_head)
    loaded.set_output_embeddings(new_head)
    out = loaded(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, torch.tensor(LOSS_0_1_0), rtol=1e-5, atol=0)
    hooks = [h for h in new_head._forward_pre_hooks.values() if h is _capture_pre_hook]
    assert len(hooks) == 1
    fused_dft.unpatch_model(loaded)
    for module in (*loaded.modules(), old_head):
        assert _capture_pre_hook not in module._forward_pre_hooks.values()
        assert "_fused_dft_slot" not in module.__dict__
