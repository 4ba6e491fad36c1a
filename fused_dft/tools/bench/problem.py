"""One benchmark problem: shapes, seeded inputs, the float64 reference and error measures.

Inputs are drawn from a fixed seed (on the CPU, or on the GPU for CUDA problems), so every worker
process builds the same tensors:
W ~ N(0, 1/D) (rows of norm ~1, logits of std ~1), labels uniform in [0, V), and
h = N(0, 1) + s * u * W[label] with u ~ U(0, 1), s = 12, so that p(label) spreads from ~0 to ~1
as in a partly trained model (with pure noise every DFT weight exp(-ce) would be ~1/V).
About a fraction `ignore_frac` of the labels (chosen at random) is set to ignore_index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100
LABEL_BOOST = 12.0

# (hidden size D, vocabulary size V) of real models' LM heads
PRESETS: dict[str, tuple[int, int]] = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-1.5b": (1536, 151936),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


# --loss-type logprobs: the per-token log-prob op (logprobs.py), not a member of the family
LOGPROBS = "logprobs"


@dataclass(frozen=True)
class Problem:
    """tokens N, hidden D, vocab V; dtype as a torch name ("float32"); loss_type any member of
    fused_dft's family (family.loss_types()), at its default parameters, or "logprobs" (the
    per-token log-prob op, logprobs.py)."""

    tokens: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    device: str = "cpu"
    loss_type: str = "dft"
    ignore_frac: float = 0.3
    seed: int = 0
    nproc: int = 1  # processes of the vocab-parallel provider (the others run in one)
    family_params: str = ""  # the loss_type's parameters, "name=value,..." ("eaft_topk=20")

    @property
    def params(self) -> dict:
        """family_params by name: an int where the value is one, else a float."""
        return parse_family_params(self.family_params)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape(self) -> dict[str, int]:
        return {"tokens": self.tokens, "hidden": self.hidden, "vocab": self.vocab}

    def as_dict(self) -> dict:
        return asdict(self)


def parse_family_params(text: str) -> dict:
    """ "eaft_topk=20,eaft_alpha=0.5" -> {"eaft_topk": 20, "eaft_alpha": 0.5}; ValueError if
    an item is not name=number."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not name=value")
        try:
            out[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a number") from None
    return out


def make_inputs(problem: Problem, requires_grad: bool = True):
    """(hidden (N, D), weight (V, D), labels (N,)) on problem.device; hidden and weight are leaves
    that require grad. The same problem gives the same tensors in every process: drawn on the CPU,
    or on CUDA with a CUDA generator (a 128k x 4k weight takes seconds to draw on a CPU)."""
    n, d, v = problem.tokens, problem.hidden, problem.vocab
    device = torch.device(problem.device)
    where = device if device.type == "cuda" else torch.device("cpu")
    gen_w = torch.Generator(device=where).manual_seed(problem.seed)
    weight = torch.randn(v, d, generator=gen_w, device=where) / math.sqrt(d)
    gen_t = torch.Generator(device=where).manual_seed(problem.seed + 1)
    labels = torch.randint(0, v, (n,), generator=gen_t, device=where)
    boost = torch.rand(n, generator=gen_t, device=where) * LABEL_BOOST
    hidden = torch.randn(n, d, generator=gen_t, device=where)
    hidden.add_(boost[:, None] * weight[labels])
    gen_m = torch.Generator(device=where).manual_seed(problem.seed + 2)
    ignored = torch.rand(n, generator=gen_m, device=where) < problem.ignore_frac
    labels[ignored] = IGNORE_INDEX

    dtype = problem.torch_dtype
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return hidden, weight, labels.to(device)


def family_inputs(problem: Problem, labels: torch.Tensor, hidden=None, weight=None) -> dict:
    """The per-token inputs a loss_type needs besides labels, the same for any prefix of the
    tokens: old_logprobs (psft's) cycle through 0, -0.2, ..., -3 (ratios p / exp(old) land below,
    inside and above the clip range); asft's reference model is the starting model (ref_hidden
    = hidden, ref_weight = weight, detached: the reference's own weights are an input, not
    memory of the loss, so its peak memory shows what the loss adds)."""
    from fused_dft.family import member

    params = problem.params
    if problem.loss_type == LOGPROBS:  # not a loss of the family: no options
        return {}
    if member(problem.loss_type).needs_reference:
        return {"ref_hidden": hidden.detach(), "ref_weight": weight.detach(), **params}
    if not member(problem.loss_type).needs_old_logprobs:
        return params
    n = labels.shape[0]
    old = -(torch.arange(n, device=labels.device) % 16).float() * 0.2
    return {"old_logprobs": old, **params}


def reference_float64(hidden, weight, labels, loss_type: str, bias=None, **options):
    """Loss and gradients in float64 via fused_dft's plain-torch reference: (loss, dh, dW, db)."""
    from fused_dft import fused_linear_dft_loss

    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    loss = fused_linear_dft_loss(
        h, w, labels, b, loss_type=loss_type, ignore_index=IGNORE_INDEX, impl="reference", **options
    )
    loss.backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def rel_error(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (normalised max error; inf when x is missing or not finite)."""
    if x is None:
        return math.inf
    x = x.detach().double()
    ref = ref.detach().double().to(x.device)
    if not bool(torch.isfinite(x).all()):
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (x - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def tolerance(dtype: str, device: str, torch_error: float | None = None) -> float:
    """Error allowed for a fused result: the dtype's floor, or 4x plain torch's own error.

    fp32 on CUDA allows TF32-sized errors: Triton's fp32 tl.dot uses TF32 by default there.
    """
    floors = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2, "float64": 1e-10}
    floor = floors[canonical_dtype(dtype)]
    if canonical_dtype(dtype) == "float32" and device.startswith("cuda"):
        floor = 5e-3
    if torch_error is not None and math.isfinite(torch_error):
        return max(floor, 4 * torch_error)
    return floor


def canonical_dtype(name: str) -> str:
    return str(DTYPES[name]).removeprefix("torch.")
