"""DeepSpeed ZeRO-3 support of the patch (fused_dft/hf/zero.py) without DeepSpeed: stand-ins for a
partitioned parameter (the attributes ZeRO-3 gives one: ds_id, ds_shape, ds_tensor). The runs
under DeepSpeed itself are tests/test_deepspeed.py."""

from __future__ import annotations

import collections
import enum
import sys

import pytest
import torch
from torch import nn

from fused_dft.hf import zero
from fused_dft.hf.model import _lm_head


def partitioned_head(v=7, d=4):
    """An nn.Linear whose weight looks as ZeRO-3 leaves it: data (0,), full shape in ds_shape."""
    head = nn.Linear(d, v, bias=False)
    head.weight = nn.Parameter(torch.empty(0))
    head.weight.ds_id, head.weight.ds_shape = 3, torch.Size((v, d))
    return head


def test_partitioned_weight_is_read_by_its_full_shape():
    head = partitioned_head()
    assert zero.is_partitioned(head.weight) and not zero.is_partitioned(torch.ones(2))
    assert zero.full_shape(head.weight) == (7, 4)
    assert zero.full_shape(torch.ones(2, 3)) == (2, 3)

    class Model(nn.Module):
        def get_output_embeddings(self):
            return head

    assert _lm_head(Model()) is head  # refused as "not a 2-D tensor" before


def test_head_read_without_deepspeeds_getter():
    """DeepSpeed replaces a module's _parameters by a dict whose __getitem__ gathers a partitioned
    parameter (and registers it as external to the running module); the patch never goes
    through it."""
    head = partitioned_head()

    class Gathering(collections.OrderedDict):
        def __getitem__(self, key):
            raise AssertionError("the getter ran")

    head._parameters = Gathering(head._parameters)
    weight, bias = zero.raw_params(head)
    assert weight.ds_id == 3 and bias is None


def test_nvme_parameter_offload_refused_naming_the_setting():
    class Location(enum.Enum):
        nvme = "nvme"
        cpu = "cpu"

    head = partitioned_head()
    head.weight.ds_tensor = torch.empty(0)
    head.weight.ds_tensor.final_location = Location.cpu
    zero.check_offload("Qwen2ForCausalLM", head.weight)  # cpu offload: fine
    head.weight.ds_tensor.final_location = Location.nvme
    with pytest.raises(ValueError, match=r"offload_param\.device: nvme.*Qwen2ForCausalLM|Qwen2"):
        zero.check_offload("Qwen2ForCausalLM", head.weight)


def test_patch_never_imports_deepspeed_without_zero3(monkeypatch):
    """deepspeed unimportable (None in sys.modules): patch, verify and a training step work."""
    import fused_dft

    from ..hf.helpers import ragged_batch, tiny_model

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    model = fused_dft.patch_model(tiny_model("llama"), loss_type="ce")
    inputs, labels = ragged_batch()
    model(**inputs, labels=labels).loss.backward()
    assert model.lm_head.weight.grad is not None
    with zero.gathered([torch.ones(1), None]), zero.gathered_model(model):
        pass
