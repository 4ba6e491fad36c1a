"""Expected GPU times of naive, chunked, fused and the 3-GEMM bound, from FLOPs and bytes.

Nothing runs: each provider is a list of phases (one GEMM or one pass over memory), and a phase
takes max(FLOPs / achievable rate, bytes / achievable bandwidth); phases run one after another,
so a provider's time is their sum. `fused-dft bench --expected` prints the table; `make
gpu-check` prints measured / expected per provider, so the first GPU run shows where this is
wrong. Every figure it gives is "expected", not measured.

Rates (GPUS): dense 16-bit tensor-core TFLOP/s (the datasheets give twice that "with sparsity")
and HBM TB/s, from the vendors' datasheets (the source beside each). Achievable fractions:
    GEMM_EFFICIENCY      0.80: cuBLAS bf16 8192^3 reached ~790 of 989 TFLOP/s on an H100 and an
                         H200 of this project's machines (docs/triton-on-cpu.md, "GPU machine")
    FUSED_EFFICIENCY     0.60: assumed for the Triton fused kernels (128 x 128 tiles, 1 CTA per SM,
                         the epilogue not overlapped; issue 17's audit): a first GPU run corrects it
    BANDWIDTH_EFFICIENCY 0.90: assumed for large streaming passes (a device copy reaches ~90%)

Bytes per element of the logits (M = rows x V elements, b = 2 bytes for bf16/fp16), per provider:
    naive    GEMM writes b; .float() b + 4; log_softmax 4 + 4; its backward: nll 4, log_softmax
             4 + 4 + 4, .float() 4 + b; the dh and dW GEMMs read b each: 32 + 5b = 42 B
    chunked  GEMM writes b; the row kernels read b (partials), read and write b (dz in place);
             the dh and dW GEMMs read b each: 6b = 12 B; plus the fp32 dW: zeroed (4 V D), read
             and written by each chunk's GEMM (8 V D per chunk), scaled into the weight dtype
             (4 + b) V D
    fused    dz written once (b) and read by the dh and dW GEMMs (2b): 3b = 6 B; the fp32 dh
             accumulator read and written per vocab chunk of the dz scratch (8 T D per chunk)
    bound    the logits written once and read twice: 3b
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GEMM_EFFICIENCY = 0.80
FUSED_EFFICIENCY = 0.60
BANDWIDTH_EFFICIENCY = 0.90
FP32 = 4  # bytes of an fp32 accumulator element


@dataclass(frozen=True)
class Gpu:
    key: str  # what --gpu takes
    name: str
    tflops: float  # dense bf16 / fp16 tensor-core TFLOP/s
    hbm_tbs: float  # memory bandwidth, TB/s
    source: str


GPUS: dict[str, Gpu] = {
    g.key: g
    for g in (
        Gpu("h100", "H100 SXM", 989.4, 3.35,
            "NVIDIA H100 datasheet: BF16 1,979 TFLOPS with sparsity, 3.35 TB/s HBM3"),
        Gpu("h200", "H200 SXM", 989.4, 4.8,
            "NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity, 4.8 TB/s HBM3e"),
        Gpu("a100", "A100 SXM 80GB", 312.0, 2.039,
            "NVIDIA A100 datasheet: BF16 312 TFLOPS dense, 2,039 GB/s HBM2e"),
        Gpu("l40s", "L40S", 362.05, 0.864,
            "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity), 864 GB/s"),
        Gpu("4090", "GeForce RTX 4090", 165.2, 1.008,
            "NVIDIA Ada GPU architecture whitepaper: BF16 with FP32 accumulate 165.2 TFLOPS "
            "dense, 1,008 GB/s GDDR6X"),
        Gpu("b200", "B200", 2250.0, 8.0,
            "NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS with sparsity per GPU, 8 TB/s "
            "HBM3e"),
    )
}  # fmt: skip


# torch.cuda.get_device_name() -> the GPUS key whose peaks it has; first match wins. Parts whose
# peaks differ from the table's are not matched (H100 PCIe / NVL, H200 NVL, A100 40GB or PCIe,
# RTX 4090 D, GH200 whose name holds "H200" but not as a word): measured only for them.
DEVICE_NAMES: tuple[tuple[str, str], ...] = (
    (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", "h100"),  # NVIDIA H100 80GB HBM3
    (r"\bH200\b(?!.*\bNVL\b)", "h200"),  # NVIDIA H200
    (r"\bA100-SXM4-80GB\b", "a100"),  # NVIDIA A100-SXM4-80GB
    (r"\bL40S\b", "l40s"),  # NVIDIA L40S
    (r"\bRTX 4090\b(?! D\b)(?!.*Laptop)", "4090"),  # NVIDIA GeForce RTX 4090
    (r"\bB200\b", "b200"),  # NVIDIA B200
)


def gpu_for_device(name: str) -> Gpu | None:
    """The model's GPU for a torch device name, or None when the table has no GPU with its
    peaks (the caller prints measured times only)."""
    for pattern, key in DEVICE_NAMES:
        if re.search(pattern, name, re.IGNORECASE):
            return GPUS[key]
    return None


@dataclass(frozen=True)
class Shape:
    """N tokens of which a fraction is ignored, hidden D, vocabulary V, elem_bytes of the dtype."""

    tokens: int
    hidden: int
    vocab: int
    ignore_frac: float = 0.0
    elem_bytes: int = 2

    @property
    def rows(self) -> int:
        """The non-ignored tokens: what the trimmed paths multiply."""
        return round(self.tokens * (1 - self.ignore_frac))


@dataclass(frozen=True)
class Phase:
    name: str
    flops: float
    bytes: float
    kind: str  # "gemm" (cuBLAS), "fused" (the Triton fused kernels) or "memory" (a pass)

    def seconds(self, gpu: Gpu) -> float:
        """max(compute, memory): a phase is bound by the slower of the two."""
        efficiency = {"gemm": GEMM_EFFICIENCY, "fused": FUSED_EFFICIENCY, "memory": 1.0}
        compute = self.flops / (gpu.tflops * 1e12 * efficiency[self.kind])
        memory = self.bytes / (gpu.hbm_tbs * 1e12 * BANDWIDTH_EFFICIENCY)
        return max(compute, memory)


def _gemm(name: str, m: int, n: int, k: int, extra_bytes: float, b: int, kind="gemm") -> Phase:
    """C (m, n) = A (m, k) B (k, n): 2mnk FLOPs; A and B read once, C written once in b bytes,
    plus extra_bytes (an fp32 C read and written, re-reads of an operand)."""
    return Phase(name, 2.0 * m * n * k, (m * k + k * n + m * n) * b + extra_bytes, kind)


def naive_phases(s: Shape) -> list[Phase]:
    """TRL / the DFT code: bf16 logits of every row, upcast, log_softmax, autograd back."""
    n, d, v, b = s.tokens, s.hidden, s.vocab, s.elem_bytes
    m = n * v
    return [
        _gemm("logits = h W^T", n, v, d, 0, b),
        Phase("float, log_softmax, nll", 0, m * (b + 4 + 4 + 4), "memory"),
        Phase("their backward", 0, m * (4 + 12 + 4 + b), "memory"),
        _gemm("dh = g W", n, d, v, 0, b),
        _gemm("dW = g^T h", v, d, n, 0, b),
    ]


def chunked_phases(s: Shape, chunk_rows: int) -> list[Phase]:
    """fused_dft chunked (trimmed rows): per chunk of chunk_rows tokens the logits GEMM, the row
    kernels, the dh GEMM and the dW GEMM into an fp32 dW; then one scale-and-cast pass."""
    t, d, v, b = s.rows, s.hidden, s.vocab, s.elem_bytes
    chunks = max(1, math.ceil(t / chunk_rows))
    weight_rereads = (chunks - 1) * v * d * b  # W read once per chunk by each of two GEMMs
    return [
        Phase("zero the fp32 dW", 0, FP32 * v * d, "memory"),
        _gemm("logits (per chunk)", t, v, d, weight_rereads, b),
        Phase("row kernels: partials, dz in place", 0, 3 * t * v * b, "memory"),
        _gemm("dh = dz W", t, d, v, weight_rereads, b),
        _gemm("dW += dz^T h (fp32 C)", v, d, t, chunks * 2 * FP32 * v * d, b),
        Phase("dW x upstream -> weight dtype", 0, (FP32 + b) * v * d, "memory"),
    ]


def fused_phases(s: Shape, scratch_bytes: int | None = None, token_chunk: int = 16384) -> list:
    """fused_dft fused (trimmed rows): the forward kernel (partials, no logits stored); backward:
    the dz kernel recomputes the logits into a scratch of scratch_bytes (default: the CUDA
    cap, backends/fused.py's DZ_SCRATCH_MAX_BYTES, on a GPU with room), then the dW and dh
    GEMMs per vocab chunk (dh accumulated in fp32); dW written once when one token chunk holds
    every token (backends/fused.py)."""
    if scratch_bytes is None:
        from fused_dft.backends.fused import DZ_SCRATCH_MAX_BYTES as scratch_bytes
    t, d, v, b = s.rows, s.hidden, s.vocab, s.elem_bytes
    rows = max(1, min(t, token_chunk))
    cols = min(v, max(128, scratch_bytes // (rows * b) // 128 * 128))
    vocab_chunks = math.ceil(v / cols)
    token_chunks = max(1, math.ceil(t / token_chunk))
    dw_extra = 0 if token_chunks == 1 else token_chunks * 2 * FP32 * v * d
    return [
        Phase("forward kernel (partials)", 2.0 * t * v * d, (t * d + v * d) * b, "fused"),
        Phase(
            "dz kernel (logits again, dz)", 2.0 * t * v * d, (t * d + v * d + t * v) * b, "fused"
        ),  # fmt: skip
        _gemm("dW = dz^T h", v, d, t, dw_extra, b),
        _gemm("dh += dz W (fp32 C)", t, d, v, vocab_chunks * 2 * FP32 * t * d, b),
    ]


def bound_phases(s: Shape) -> list[Phase]:
    """The three GEMMs of the non-ignored rows: logits, dh, dW (6 T D V FLOPs)."""
    t, d, v, b = s.rows, s.hidden, s.vocab, s.elem_bytes
    return [
        _gemm("logits", t, v, d, 0, b),
        _gemm("dh", t, d, v, 0, b),
        _gemm("dW", v, d, t, 0, b),
    ]


def default_chunk_rows(vocab: int) -> int:
    """The chunked path's rows on a GPU with room: backends/chunked.py's 1G-element cap."""
    from fused_dft.backends.chunked import _CHUNK_ELEMENTS, _CUDA_ROW_MULTIPLE

    rows = _CHUNK_ELEMENTS["cuda"] // max(vocab, 1)
    return max(_CUDA_ROW_MULTIPLE, rows // _CUDA_ROW_MULTIPLE * _CUDA_ROW_MULTIPLE)


PROVIDERS = ("naive", "chunked", "fused", "bound")


def phases(provider: str, s: Shape) -> list[Phase]:
    if provider == "naive":
        return naive_phases(s)
    if provider in ("chunked", "auto"):
        return chunked_phases(s, default_chunk_rows(s.vocab))
    if provider == "fused":
        return fused_phases(s)
    if provider == "bound":
        return bound_phases(s)
    raise ValueError(f"provider {provider!r}: no expected time; choose from {PROVIDERS}")


@dataclass(frozen=True)
class Expected:
    provider: str
    flops: float
    bytes: float
    seconds: float


def expected(provider: str, s: Shape, gpu: Gpu) -> Expected:
    ps = phases(provider, s)
    return Expected(
        provider,
        sum(p.flops for p in ps),
        sum(p.bytes for p in ps),
        sum(p.seconds(gpu) for p in ps),
    )


def parse_gpus(text: str | None) -> list[Gpu]:
    keys = [k.strip().lower() for k in (text or "").split(",") if k.strip()] or list(GPUS)
    unknown = [k for k in keys if k not in GPUS]
    if unknown:
        raise ValueError(f"--gpu {unknown}: unknown GPU; choose from {', '.join(GPUS)}")
    return [GPUS[k] for k in keys]


def table(s: Shape, gpus: list[Gpu]) -> str:
    """One row per GPU and provider: TFLOP, GB moved, expected ms and x bound."""
    head = f"{'gpu':<17} {'provider':<8} {'TFLOP':>7} {'GB':>7} {'expected':>10} {'x bound':>8}"
    lines = [head, "-" * len(head)]
    for gpu in gpus:
        bound = expected("bound", s, gpu).seconds
        for provider in PROVIDERS:
            e = expected(provider, s, gpu)
            lines.append(
                f"{gpu.name:<17} {provider:<8} {e.flops / 1e12:>7.1f} {e.bytes / 1e9:>7.1f} "
                f"{e.seconds * 1e3:>7.1f} ms {e.seconds / bound:>7.2f}x"
            )
    return "\n".join(lines)


def sources(gpus: list[Gpu]) -> str:
    return "\n".join(f"  {g.name}: {g.tflops:g} TFLOP/s, {g.hbm_tbs:g} TB/s ({g.source})"
                     for g in gpus)  # fmt: skip
