"""Launch configs of the fused kernels: the validated FusedConfig, the shipped candidates keyed on
the dtype and the D/V buckets, the override for experiments, and the triton.autotune switch.

Which config a fused launch uses, first match wins:
  0. a FusedConfig passed to the launcher (fused_partials / fused_dz) by its caller;
  1. an override: `use_fused_config(...)` in Python, else FUSED_DFT_FUSED_CONFIG in the environment
     ("block_n=128,num_stages=3": unnamed fields keep the bucket's default);
  2. the interpreter (CPU): INTERPRETER_CONFIG, one fixed config (it cannot autotune several);
  3. CUDA with FUSED_DFT_AUTOTUNE=0: the bucket's default (its first candidate);
  4. CUDA: triton.autotune over the bucket's candidates, keyed on the kernel's own argument
     names in FWD_KEY / DZ_KEY (D, V or none, and n_bucket: the batch's N rounded up to a power
     of two), the compile-time flags and the dtypes (Triton adds the dtypes of tensor arguments
     to the key itself). check_key refuses a name that is not an argument of the kernel (Triton
     would drop it silently and reuse one config for every value).
Forward and backward tune independently over the same candidates. vocab_splits sizes the forward's
grid and partial buffer on the host, so every candidate of a bucket shares it.

The candidates were chosen from CPU-side compiles (`fused-dft kernels`: registers, spills, shared
memory for sm_90 with triton 3.6 and 3.9), not from GPU timings: `make gpu-check` sweeps them.
They depend on the GPU's arch (device_arch, from its compute capability): sm_90 and sm_80 get
CONFIG_SETS (sm_80 without the two-halves tiles, v_halves=2, which only sm_90 is offered), every
other arch SMALL_SETS (tiles that compile without spills within 99 KB).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import torch

from .common import tf32_allowed

ENV_CONFIG = "FUSED_DFT_FUSED_CONFIG"
ENV_AUTOTUNE = "FUSED_DFT_AUTOTUNE"

TILE_FIELDS = ("block_n", "block_v", "block_d")
MIN_TILE, MAX_TILE = 16, 256  # tl.dot needs >= 16 along every dimension
WARPS = (1, 2, 4, 8, 16, 32)
MAX_STAGES = 8
MAX_VOCAB_SPLITS = 1024
MAX_GROUP_N = 64
V_HALVES = (1, 2)


@dataclass(frozen=True)
class FusedConfig:
    """Tile sizes and launch options of the fused kernels; invalid values raise ValueError.

    block_n tokens x block_v vocabulary entries per logits tile, accumulated over D in block_d steps
    (powers of two in [16, 256]); num_warps a power of two in [1, 32]; num_stages in [1, 8];
    group_n: token blocks per group of the L2-aware program order, in [1, 64];
    vocab_splits: forward programs per token block along the vocabulary, in [1, 1024], or None
    (written "auto"): chosen from the SM count and the number of token blocks;
    v_halves: 1, or 2 for a block_n x (2 * block_v) logits tile per program step computed as two
    block_v-wide halves that share each h load (two accumulators; the epilogue runs on one half
    at a time, so its temporaries stay block_n x block_v sized): the FLOP per byte loaded of the
    wide tile (85 at 128 x 2*128 in 16-bit, against 64 at 128 x 128).
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 2
    group_n: int = 8
    vocab_splits: int | None = None
    v_halves: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "vocab_splits" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"FusedConfig.{f.name} must be an int, got {value!r}")
        for name in TILE_FIELDS:
            value = getattr(self, name)
            if not (MIN_TILE <= value <= MAX_TILE and value & (value - 1) == 0):
                raise ValueError(
                    f"FusedConfig.{name}={value}: must be a power of two in [{MIN_TILE}, "
                    f"{MAX_TILE}] (tl.dot needs at least 16 along every dimension)"
                )
        if self.num_warps not in WARPS:
            raise ValueError(f"FusedConfig.num_warps={self.num_warps}: choose from {WARPS}")
        if not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(
                f"FusedConfig.num_stages={self.num_stages}: must be in [1, {MAX_STAGES}]"
            )
        if not 1 <= self.group_n <= MAX_GROUP_N:
            raise ValueError(f"FusedConfig.group_n={self.group_n}: must be in [1, {MAX_GROUP_N}]")
        if self.v_halves not in V_HALVES:
            raise ValueError(f"FusedConfig.v_halves={self.v_halves}: choose from {V_HALVES}")
        if self.vocab_splits is not None and not 1 <= self.vocab_splits <= MAX_VOCAB_SPLITS:
            raise ValueError(
                f"FusedConfig.vocab_splits={self.vocab_splits}: must be in [1, {MAX_VOCAB_SPLITS}]"
            )

    @property
    def meta(self) -> dict[str, int]:
        """The kernels' tile constexprs."""
        return {
            "BLOCK_N": self.block_n,
            "BLOCK_V": self.block_v,
            "BLOCK_D": self.block_d,
            "GROUP_N": self.group_n,
            "V_HALVES": self.v_halves,
        }

    @property
    def tile_v(self) -> int:
        """Vocabulary columns of one program step: block_v x v_halves."""
        return self.block_v * self.v_halves

    @property
    def spec(self) -> str:
        """The form FUSED_DFT_FUSED_CONFIG and parse() take: 'block_n=64,block_v=128,...'."""
        return ",".join(f"{k}={'auto' if v is None else v}" for k, v in asdict(self).items())

    @classmethod
    def parse(cls, text: str, base: FusedConfig | None = None) -> FusedConfig:
        """'block_n=128,num_stages=3' -> a config; unnamed fields come from `base`."""
        names = [f.name for f in fields(cls)]
        where = f"fused config {text!r}"
        values = {}
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or key not in names:
                raise ValueError(f"{where}: unknown field {key!r}; choose from {names}")
            if key == "vocab_splits" and raw == "auto":
                values[key] = None
                continue
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"{where}: {key}={raw!r} is not an integer") from None
        if not values:
            raise ValueError(f"{where}: expected fields like 'block_n=64,block_v=128'")
        return replace(base or cls(), **values)


# -- the shipped candidates ----------------------------------------------------------------------

# Under the interpreter every tile iteration costs ~2 ms: large tiles keep the tests fast.
INTERPRETER_CONFIG = FusedConfig(64, 128, 64, num_warps=8, num_stages=2)

# the class defaults
DEFAULT_CONFIG = FusedConfig()

DTYPE_CLASSES = ("16bit", "tf32", "fp32")


def dtype_class(dtype: torch.dtype) -> str:
    """'16bit' (bf16/fp16 tensor-core operands), 'tf32' (fp32 with TF32 allowed: tensor cores,
    operands twice the size) or 'fp32' (IEEE fp32: FMA, no tensor cores)."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if tf32_allowed() else "fp32"


def d_bucket(d: int) -> str:
    """D is the logits tile's K loop: from 2048 on it is long enough for deeper pipelines."""
    return "D>=2048" if d >= 2048 else "D<2048"


def v_bucket(v: int) -> str:
    """No candidate differs by V yet (V is in the autotune key itself); a GPU sweep that finds a
    difference puts it here."""
    return "V>=65536" if v >= 65536 else "V<65536"


# Candidates, the default first, for the forward and the dz kernel alike. Registers and spills
# from `fused-dft kernels` (sm_90 and sm_80, triton 3.6 and 3.9; bench/README.md has the table):
# no candidate spills on sm_90. 128 x 128 tiles give 64 FLOP per byte of operand traffic (twice
# 64 x 128's); the forward's online log-sum-exp epilogue keeps it at ~250 registers, so a plain
# 128 x 256 or 256 x 128 tile spills in both kernels (issue 17, triton 3.9, 12 configs: block_d
# 32 / 64, 8 warps at 255 registers or 16 capped at 128, 2-4 stages; 32-216 B/thread).
# Hopper-sized tiles, issue 17: v_halves=2 computes a 128 x 256 tile per program step as two
# 128 x 128 halves that share each h load (two accumulators, 128 fp32 registers per thread with
# 8 warps) and runs the epilogue on one half at a time (temporaries of a 128 x 128 tile): 85 FLOP
# per byte in 16-bit (tf32: 43, against 32). It compiles for sm_90 with no spills in both
# kernels, with triton 3.6 and 3.9, at block_d 64 (16-bit) / 32 (tf32), 8 warps, 2 or 3 stages
# (96 / 144 KB, 255 registers, wgmma); with 3.9, 4 stages, block_d 32 in 16-bit and 16 warps
# spill (8-48 B/thread), IEEE fp32 spills 888 B; on sm_80 the dz kernel spills (120-176 B).
# Offered after the 128 x 128 ones, which stay the default without autotuning: the autotuner on
# a GPU picks a two-halves tile only where it measures faster.
_C = FusedConfig
_HOPPER_16BIT = (
    _C(128, 128, 64, num_warps=8, num_stages=3, v_halves=2),
    _C(128, 128, 64, num_warps=8, num_stages=2, v_halves=2),
)
_16BIT_SHORT_D = (
    _C(128, 128, 64, num_warps=8, num_stages=3),
    _C(64, 128, 64, num_warps=8, num_stages=3),
    _C(128, 128, 64, num_warps=8, num_stages=2),
    *_HOPPER_16BIT,
)
_16BIT_LONG_D = (
    _C(128, 128, 64, num_warps=8, num_stages=3),
    _C(128, 128, 64, num_warps=8, num_stages=2),
    _C(64, 128, 64, num_warps=8, num_stages=4),
    *_HOPPER_16BIT,
)
# fp32 operands take twice the shared memory and registers of 16-bit ones
_TF32 = (
    _C(128, 128, 32, num_warps=8, num_stages=3),
    _C(64, 128, 32, num_warps=8, num_stages=3),
    _C(128, 128, 32, num_warps=8, num_stages=3, v_halves=2),
    _C(128, 128, 32, num_warps=8, num_stages=2, v_halves=2),
)
# IEEE fp32 runs on FMA units: smaller tiles keep the accumulator in registers
_FP32 = (
    _C(64, 128, 32, num_warps=8, num_stages=3),
    _C(64, 64, 32, num_warps=4, num_stages=3),
)

# (dtype class, D bucket, V bucket) -> candidates
CONFIG_SETS: dict[tuple[str, str, str], tuple[FusedConfig, ...]] = {
    ("16bit", "D<2048", "V<65536"): _16BIT_SHORT_D,
    ("16bit", "D<2048", "V>=65536"): _16BIT_SHORT_D,
    ("16bit", "D>=2048", "V<65536"): _16BIT_LONG_D,
    ("16bit", "D>=2048", "V>=65536"): _16BIT_LONG_D,
    ("tf32", "D<2048", "V<65536"): _TF32,
    ("tf32", "D<2048", "V>=65536"): _TF32,
    ("tf32", "D>=2048", "V<65536"): _TF32,
    ("tf32", "D>=2048", "V>=65536"): _TF32,
    ("fp32", "D<2048", "V<65536"): _FP32,
    ("fp32", "D<2048", "V>=65536"): _FP32,
    ("fp32", "D>=2048", "V<65536"): _FP32,
    ("fp32", "D>=2048", "V>=65536"): _FP32,
}


# Every other arch: sm_80 (163 KB of shared memory per block), sm_86 / sm_89 / sm_120 (99 KB),
# sm_100 (227 KB). Their dots are mma.sync (tcgen05 on sm_100 through Triton 3.9) with the
# accumulator in registers, and the forward at 128 x 128 x 64 spills there (`fused-dft kernels
# --arch sm_86,sm_89,sm_100,sm_120`, triton 3.9: 255 registers, 8-40 B/thread of spills): only
# tiles of 64 x 128 or 128 x 64 are offered, which compile to 143-187 registers without spills
# in 48-72 KB (bench/README.md has the table), under every one of these limits.
_SMALL_16BIT = (
    _C(64, 128, 64, num_warps=8, num_stages=3),
    _C(128, 64, 64, num_warps=8, num_stages=3),
    _C(64, 128, 64, num_warps=8, num_stages=4),
)
_SMALL_TF32 = (
    _C(64, 128, 32, num_warps=8, num_stages=3),
    _C(128, 64, 32, num_warps=8, num_stages=3),
)
SMALL_SETS: dict[str, tuple[FusedConfig, ...]] = {
    "16bit": _SMALL_16BIT,
    "tf32": _SMALL_TF32,
    "fp32": _FP32[:1],  # 64 x 64 x 32 with 4 warps spills 8 B/thread in the forward on sm_80
}
# the archs whose candidates are CONFIG_SETS: 128 x 128 tiles compile there without spills (sm_90:
# wgmma; sm_80: mma.sync at 255 registers, 0 B, 64 KB of its 163 KB), except IEEE fp32 on sm_80
# (its 64 x 64 x 32 w4 forward spills 8 B there): SMALL_SETS["fp32"]
LARGE_TILE_ARCHS = ("sm_80", "sm_90")


# the archs offered the two-halves tiles (v_halves=2) of CONFIG_SETS: they were compiled without
# spills for sm_90 only; every other arch of CONFIG_SETS gets the sets without them
HALVES_ARCHS = ("sm_90",)

# asft's HAS_REF variant of both kernels holds two fp32 tiles at once (the policy's z or dz and
# the reference's logits tile), so it gets its own, smaller tiles (`fused-dft kernels --kernel
# fused_fwd_ref,fused_bwd_ref`, triton 3.9). At the 16-bit default 128 x 128 x 64 the sm_90
# forward spills 144 B/thread (255 registers; the dz kernel 235, no spill); at 64 x 128 x 64 it
# takes 218 (3 stages) / 194 (2) registers on sm_90 without spills, the dz kernel 127. Elsewhere
# (mma.sync, accumulators in registers) 64 x 128 x 64 spills 8 B on sm_120 (and with 2 stages on
# sm_80): 64 x 128 x 32 for 16 bits; tf32 there spills at 32 x 128 x 32 (8-32 B, w4 or w8) and
# gets 32 x 64 x 32 w4 s2, as IEEE fp32 (FMA) does everywhere: 64 x 128 x 32 spills 40-168 B on
# sm_80 / sm_89 / sm_90, 64 x 64 x 32 w4 32-296 B, 32 x 64 x 32 w4 s2 none.
_REFERENCE_SM90 = {
    "16bit": (
        _C(64, 128, 64, num_warps=8, num_stages=3),
        _C(64, 128, 64, num_warps=8, num_stages=2),
    ),
    "tf32": (_C(64, 128, 32, num_warps=8, num_stages=3),),
    "fp32": (_C(32, 64, 32, num_warps=4, num_stages=2),),
}
_REFERENCE_OTHER = {
    "16bit": (_C(64, 128, 32, num_warps=8, num_stages=3),),
    "tf32": _REFERENCE_SM90["fp32"],
    "fp32": _REFERENCE_SM90["fp32"],
}


def reference_configs(cls: str, arch: str = "sm_90") -> tuple[FusedConfig, ...]:
    """The HAS_REF variant's candidates (asft) for a dtype class and arch; the first is the
    default."""
    return (_REFERENCE_SM90 if arch == "sm_90" else _REFERENCE_OTHER)[cls]


def reference_config_set(dtype: torch.dtype, arch: str = "sm_90") -> tuple[FusedConfig, ...]:
    """reference_configs of this dtype's class."""
    return reference_configs(dtype_class(dtype), arch)


def _small(cls: str, arch: str) -> bool:
    return arch not in LARGE_TILE_ARCHS or (cls == "fp32" and arch != "sm_90")


def _for_arch(candidates: tuple[FusedConfig, ...], arch: str) -> tuple[FusedConfig, ...]:
    if arch in HALVES_ARCHS:
        return candidates
    return tuple(c for c in candidates if c.v_halves == 1)


def arch_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm_90'."""
    return f"sm_{capability[0]}{capability[1]}"


def config_set(dtype: torch.dtype, d: int, v: int, arch: str = "sm_90") -> tuple[FusedConfig, ...]:
    """The shipped candidates for this dtype, D/V bucket and arch; the first is the default."""
    if _small(dtype_class(dtype), arch):
        return SMALL_SETS[dtype_class(dtype)]
    return _for_arch(CONFIG_SETS[(dtype_class(dtype), d_bucket(d), v_bucket(v))], arch)


def shipped_configs(cls: str, arch: str = "sm_90") -> tuple[FusedConfig, ...]:
    """Every distinct candidate of every bucket of a dtype class for an arch, the buckets'
    defaults first."""
    if _small(cls, arch):
        return SMALL_SETS[cls]
    keys = [k for k in CONFIG_SETS if k[0] == cls]
    seen = [CONFIG_SETS[k][0] for k in keys] + [c for k in keys for c in CONFIG_SETS[k]]
    return _for_arch(tuple(dict.fromkeys(seen)), arch)


def default_configs(cls: str, arch: str = "sm_90") -> tuple[FusedConfig, ...]:
    """The configs used without autotuning: each bucket's first candidate."""
    if _small(cls, arch):
        return SMALL_SETS[cls][:1]
    return tuple(dict.fromkeys(c[0] for k, c in CONFIG_SETS.items() if k[0] == cls))


# -- overrides -----------------------------------------------------------------------------------

_override: list[FusedConfig | str] = []


@contextmanager
def use_fused_config(config: FusedConfig | str):
    """Within the block, fused launches use `config` (a FusedConfig, or a string for parse())
    instead of the shipped candidates: no autotuning. Validated on entry."""
    if isinstance(config, str):
        FusedConfig.parse(config)  # fail here, not at the first launch
    elif not isinstance(config, FusedConfig):
        raise TypeError(f"use_fused_config expects a FusedConfig or a str, got {config!r}")
    _override.append(config)
    try:
        yield
    finally:
        _override.pop()


def override_config(base: FusedConfig) -> FusedConfig | None:
    """The override in force (Python first, then the environment), completed from `base`."""
    if _override:
        chosen = _override[-1]
        return chosen if isinstance(chosen, FusedConfig) else FusedConfig.parse(chosen, base)
    text = os.environ.get(ENV_CONFIG, "").strip()
    if not text:
        return None
    try:
        return FusedConfig.parse(text, base)
    except ValueError as exc:
        raise ValueError(f"{ENV_CONFIG}: {exc}") from None


def autotune_enabled() -> bool:
    text = os.environ.get(ENV_AUTOTUNE, "1").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{ENV_AUTOTUNE} must be 0 or 1, got {text!r}")
    return text == "1"


# -- launching -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    """The configs one fused launch chooses from: one (a fixed launch) or several (autotuned)."""

    candidates: tuple[FusedConfig, ...]

    @property
    def vocab_splits(self) -> int | None:
        return self.candidates[0].vocab_splits

    @property
    def min_block_n(self) -> int:
        return min(c.block_n for c in self.candidates)

    @property
    def group_n(self) -> int:
        return self.candidates[0].group_n

    @property
    def max_block_v(self) -> int:
        return max(c.tile_v for c in self.candidates)

    @property
    def max_block_n(self) -> int:
        return max(c.block_n for c in self.candidates)

    def launch(self, kernel, grid, *args, key: tuple[str, ...],
               reset_to_zero: tuple[str, ...] = (), **flags) -> None:  # fmt: skip
        """kernel[grid](*args, **flags) with this plan's config(s); grid takes the meta dict.
        key: the kernel's arguments the autotuner keys on (FWD_KEY / DZ_KEY), besides the flags.

        reset_to_zero: outputs the kernel writes only in part and that are summed afterwards
        (db's per-block rows: a config with larger blocks leaves the last rows unwritten);
        autotuning zeroes them before each timed trial and once more before the real launch, so
        the first launch of a new key must find them all zero.
        """
        if len(self.candidates) == 1:
            c = self.candidates[0]
            meta = dict(c.meta, num_warps=c.num_warps, num_stages=c.num_stages)
            kernel[grid(c.meta)](*args, **flags, **meta)
        else:
            key = (*key, *sorted(flags))  # Triton adds the tensors' dtypes itself
            _autotuner(kernel, self.candidates, key, reset_to_zero)[grid](*args, **flags)


_ARCHS: dict[int, str] = {}


def device_arch(device: torch.device) -> str:
    """'sm_XY' of a CUDA device (cached); 'sm_90' where there is none (the interpreter, or a
    CUDA device named on a machine without one), whose candidates the overrides complete."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "sm_90"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCHS:
        _ARCHS[index] = arch_name(torch.cuda.get_device_capability(index))
    return _ARCHS[index]


def plan(
    dtype: torch.dtype,
    device: torch.device,
    d: int,
    v: int,
    config: FusedConfig | None = None,
    reference: bool = False,
) -> LaunchPlan:
    """Which config(s) a fused launch on `device` with inputs of `dtype` and sizes D, V uses;
    `config`, when given, is used as it is (the caller's explicit choice). reference: the
    kernels' HAS_REF variant (asft), which holds two fp32 tiles: reference_config_set's."""
    if config is not None:
        return LaunchPlan((config,))
    if reference:
        candidates = reference_config_set(dtype, device_arch(device))
    else:
        candidates = config_set(dtype, d, v, device_arch(device))
    forced = override_config(candidates[0])
    if forced is not None:
        return LaunchPlan((forced,))
    if device.type != "cuda":
        return LaunchPlan((INTERPRETER_CONFIG,))
    if not autotune_enabled():
        return LaunchPlan(candidates[:1])
    return LaunchPlan(candidates)


# -- autotune keys --------------------------------------------------------------------------------

# The forward tunes per (D, V, N bucket); the dz kernel sees one vocab chunk (V_chunk, the same
# for every chunk but the last: keying on it would tune twice per shape), so per (D, N bucket).
FWD_KEY = ("D", "V", "n_bucket")
DZ_KEY = ("D", "n_bucket")
N_BUCKET_MIN, N_BUCKET_MAX = 128, 65536


def n_bucket(n: int) -> int:
    """The autotune key's N: n rounded up to a power of two in [128, 65536]. A config tuned at
    one N serves up to twice that N; at most 10 tunings per (D, V, flags) in all. The launchers
    pass the batch's N (hidden rows), not the selected count, so a CUDA-graph capture (every row)
    reuses what its eager warm-up (the non-ignored rows) tuned. Powers of two from 128 up are
    multiples of 16: one compiled specialization serves every bucket."""
    bucket = N_BUCKET_MIN
    while bucket < min(n, N_BUCKET_MAX):
        bucket *= 2
    return bucket


def check_key(kernel, key: tuple[str, ...]) -> None:
    """Every autotune key name is an argument of the kernel (Triton ignores any other name)."""
    names = kernel.arg_names
    unknown = [k for k in key if k not in names]
    if unknown:
        raise ValueError(
            f"autotune key {list(key)} of kernel {getattr(kernel, '__name__', kernel)}: "
            f"{unknown} are not its arguments; choose from {names}"
        )


_autotuners: dict = {}


def _autotuner(kernel, candidates, key: tuple[str, ...], reset_to_zero: tuple[str, ...]):
    """One triton.autotune wrapper per kernel, candidate set, key and accumulator list."""
    import triton

    cache_key = (kernel, candidates, key, reset_to_zero)
    if cache_key not in _autotuners:
        check_key(kernel, key)
        configs = [
            triton.Config(c.meta, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in candidates
        ]
        # cache_results: the timings go to Triton's disk cache, so a new process (each bench
        # provider runs in its own) reuses them instead of timing every candidate again
        _autotuners[cache_key] = triton.autotune(
            configs=configs,
            key=list(key),
            reset_to_zero=list(reset_to_zero) or None,
            cache_results=True,
        )(kernel)
    return _autotuners[cache_key]
