"""Compile specs: how `fused-dft kernels` compiles each Triton kernel for a GPU it does not have.

A spec names a @triton.jit function, the type of each runtime argument, the compile-time flags at
which it is reported (the plain loss: no bias, scale or softcap) and its shipped configs per dtype.
A new kernel joins the report with one more CompileSpec in SPECS; `check_spec` (run by the tests)
fails when a kernel gains, loses or renames an argument that its spec does not follow.

Argument types, as Triton's runtime would specialise them at a typical training shape
(D and V multiples of 16, tensors contiguous along their last dimension):
    "*T"      pointer to the input dtype     "*fp32", "*i64"  pointers of a fixed type
    "i32"     an int                         "i32:16"         an int that is a multiple of 16
    "1"       an int equal to 1 (a unit stride): Triton compiles it in as a constant
    "fp32"    a float
Every pointer is taken as 16-byte aligned (torch's allocations are).

Report dtypes: bf16, fp16; fp32 with IEEE dots (torch's default, TF32 off); tf32: fp32 inputs with
TF32 allowed (`torch.backends.cuda.matmul.fp32_precision = "tf32"`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

# report dtype -> (Triton's name of the element type, the configs' dtype class)
DTYPES: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "16bit"),
    "fp16": ("fp16", "16bit"),
    "fp32": ("fp32", "fp32"),
    "tf32": ("fp32", "tf32"),
}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class CompileSpec:
    name: str  # what `fused-dft kernels --kernel` takes
    module: str  # the module that defines the kernel
    function: str  # the @triton.jit function's name in it
    arg_types: dict[str, str]  # every runtime (non-constexpr) argument
    flags: Callable[[str], dict[str, object]]  # report dtype -> compile-time flags
    configs: Callable[[str, str], list[str]]  # (report dtype, arch) -> every shipped config
    # (report dtype, arch) -> the configs used without autotuning
    defaults: Callable[[str, str], list[str]]
    # config text ('block_v=4096,num_warps=8') -> (tile constexprs, compile options); ValueError
    # naming the field and the valid choices when it is unknown or invalid
    parse_config: Callable[[str], tuple[dict[str, int], dict[str, int]]]
    has_dot: bool  # whether the kernel multiplies tiles with tl.dot (tensor cores expected)


def python_function(spec: CompileSpec):
    """The Python function behind the kernel, through JIT, interpreter or autotune wrappers."""
    obj = getattr(importlib.import_module(spec.module), spec.function)
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def constexpr_names(fn) -> list[str]:
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if "constexpr" in str(p.annotation)
    ]


def check_spec(spec: CompileSpec, dtype: str, config: str) -> None:
    """The spec gives every argument of the kernel exactly once, at this dtype and config."""
    fn = python_function(spec)
    params = list(inspect.signature(fn).parameters)
    constexprs = constexpr_names(fn)
    meta, _ = spec.parse_config(config)
    given = {**{k: "arg" for k in spec.arg_types}, **spec.flags(dtype), **meta}
    missing = [p for p in params if p not in given]
    extra = [k for k in given if k not in params]
    runtime_as_constexpr = [k for k in spec.arg_types if k in constexprs]
    constexpr_as_runtime = [k for k in constexprs if k not in spec.flags(dtype) and k not in meta]
    problems = {
        "kernel arguments the spec does not give": missing,
        "spec entries that are not kernel arguments": extra,
        "constexpr arguments typed as runtime ones": runtime_as_constexpr,
        "constexpr arguments without a value": constexpr_as_runtime,
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise ValueError(
            f"compile spec {spec.name!r} ({spec.module}.{spec.function}) is out of date: "
            + "; ".join(f"{k}: {v}" for k, v in problems.items())
        )


# -- the fused kernels ---------------------------------------------------------------------------

_FUSED_COMMON = {
    "h_ptr": "*T",
    "w_ptr": "*T",
    "b_ptr": "*T",
    "idx_ptr": "*i64",
    "labels_ptr": "*i64",
    "N": "i32",
    "V": "i32:16",
    "D": "i32:16",
    "stride_hn": "i32:16",
    "stride_hd": "1",
    "stride_wv": "i32:16",
    "stride_wd": "1",
    "logit_scale": "fp32",
    "softcap": "fp32",
    "n_bucket": "i32:16",  # configs.n_bucket: a power of two >= 128
    # asft's reference (read only with HAS_REF)
    "rh_ptr": "*T",
    "rw_ptr": "*T",
    "rb_ptr": "*T",
    "D_ref": "i32:16",
    "stride_rhn": "i32:16",
    "stride_rhd": "1",
    "stride_rwv": "i32:16",
    "stride_rwd": "1",
}


def _fused_flags(dtype: str, has_ref: bool = False) -> dict[str, object]:
    return dict(
        HAS_BIAS=False,
        HAS_SCALE=False,
        HAS_SOFTCAP=False,
        UPCAST=False,
        FP32_IEEE=dtype == "fp32",
        HAS_REF=has_ref,
        HAS_REF_BIAS=False,
    )


def _fused_label(config) -> str:
    """A FusedConfig as config text, without vocab_splits (a host-side choice, not compiled);
    v_halves only when it is 2."""
    names = ("block_n", "block_v", "block_d", "num_warps", "num_stages", "group_n")
    names += ("v_halves",) if config.v_halves != 1 else ()
    return ",".join(f"{k}={getattr(config, k)}" for k in names)


def _fused_configs(dtype: str, arch: str) -> list[str]:
    from fused_dft.kernels.configs import shipped_configs

    labels = [_fused_label(c) for c in shipped_configs(DTYPES[dtype][1], arch)]
    return list(dict.fromkeys(labels))


def _fused_defaults(dtype: str, arch: str) -> list[str]:
    """Each D/V bucket's default (its first candidate) on this arch."""
    from fused_dft.kernels.configs import default_configs

    labels = [_fused_label(c) for c in default_configs(DTYPES[dtype][1], arch)]
    return list(dict.fromkeys(labels))


def _reference_configs(dtype: str, arch: str) -> list[str]:
    """The HAS_REF variant's candidates (asft): configs.reference_config_set."""
    from fused_dft.kernels.configs import reference_configs

    return [_fused_label(c) for c in reference_configs(DTYPES[dtype][1], arch)]


def _reference_defaults(dtype: str, arch: str) -> list[str]:
    return _reference_configs(dtype, arch)[:1]


def _fused_parse(text: str) -> tuple[dict[str, int], dict[str, int]]:
    from fused_dft.kernels.configs import DEFAULT_CONFIG, FusedConfig

    config = FusedConfig.parse(text, DEFAULT_CONFIG)
    return config.meta, {"num_warps": config.num_warps, "num_stages": config.num_stages}


FUSED_FWD = CompileSpec(
    name="fused_fwd",
    module="fused_dft.kernels.fused_fwd",
    function="_fused_partials_kernel",
    arg_types={
        **_FUSED_COMMON,
        "count_ptr": "*i64",
        "part_ptr": "*fp32",
        "split_cols": "i32:16",
        "num_splits": "i32",
        "ref_part_ptr": "*fp32",
    },
    flags=lambda dtype: {**_fused_flags(dtype), "NEED_ENTROPY": True, "NEED_SUM": False},
    configs=_fused_configs,
    defaults=_fused_defaults,
    parse_config=_fused_parse,
    has_dot=True,
)

# the backward's kernel: the logit-gradient block (dz) of a token chunk x vocab chunk
FUSED_BWD = CompileSpec(
    name="fused_bwd",
    module="fused_dft.kernels.fused_bwd",
    function="_fused_dz_kernel",
    arg_types={
        **{k: v for k, v in _FUSED_COMMON.items() if k != "V"},
        "count_ptr": "*i64",
        "count_offset": "i32",
        "lse_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "stride_coef": "i32",
        "dz_ptr": "*T",
        "stride_dzn": "i32:16",
        "db_ptr": "*fp32",
        "stride_dbn": "i32:16",
        "V_chunk": "i32:16",
        "v_start": "i32:16",
        "ref_lse_ptr": "*fp32",
    },
    flags=lambda dtype: {
        **_fused_flags(dtype),
        "HAS_UNIFORM": False,
        "HAS_ENTROPY_GRAD": False,
        "COMPUTE_DB": True,
    },
    configs=_fused_configs,
    defaults=_fused_defaults,
    parse_config=_fused_parse,
    has_dot=True,
)

# the HAS_REF variants (asft: a second logits tile from the reference model), at their own tiles
FUSED_FWD_REF = replace(
    FUSED_FWD,
    name="fused_fwd_ref",
    flags=lambda dtype: {**FUSED_FWD.flags(dtype), "HAS_REF": True},
    configs=_reference_configs,
    defaults=_reference_defaults,
)
FUSED_BWD_REF = replace(
    FUSED_BWD,
    name="fused_bwd_ref",
    flags=lambda dtype: {**FUSED_BWD.flags(dtype), "HAS_REF": True},
    configs=_reference_configs,
    defaults=_reference_defaults,
)

# -- the row kernel of the chunked path ----------------------------------------------------------

ROWS_FIELDS = ("block_v", "num_warps")


def _rows_parse(text: str) -> tuple[dict[str, int], dict[str, int]]:
    from fused_dft.kernels.configs import WARPS

    values = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, _, raw = (s.strip() for s in item.partition("="))
        if key not in ROWS_FIELDS:
            raise ValueError(
                f"rows config {text!r}: unknown field {key!r}; choose from {list(ROWS_FIELDS)}"
            )
        if not raw.isdigit():
            raise ValueError(f"rows config {text!r}: {key}={raw!r} is not a positive integer")
        values[key] = int(raw)
    block_v = values.get("block_v", _rows_default()[0])
    num_warps = values.get("num_warps", _rows_default()[1])
    if not (16 <= block_v <= 2**16 and block_v & (block_v - 1) == 0):
        raise ValueError(f"rows config {text!r}: block_v={block_v} must be a power of two >= 16")
    if num_warps not in WARPS:
        raise ValueError(f"rows config {text!r}: num_warps={num_warps}: choose from {WARPS}")
    return {"BLOCK_V": block_v}, {"num_warps": num_warps}


def _rows_default() -> tuple[int, int]:
    from fused_dft.kernels import rows

    return rows.DEFAULT_BLOCK_V, rows.NUM_WARPS


_ROWS_COMMON = {
    "x_ptr": "*T",
    "stride_xn": "i32:16",
    "labels_ptr": "*i64",
    "n_rows": "i32",
    "V": "i32:16",
    "logit_scale": "fp32",
    "softcap": "fp32",
    "xr_ptr": "*T",  # asft's reference logits chunk (read only with HAS_REF)
    "stride_xrn": "i32:16",
}
_ROWS_CONFIGS = lambda dtype, arch: ["block_v={},num_warps={}".format(*_rows_default())]  # noqa: E731

# the chunked path's row kernels: partials of each logits row, then its gradient in place
ROWS = CompileSpec(
    name="rows",
    module="fused_dft.kernels.rows",
    function="_rows_partials_kernel",
    arg_types={**_ROWS_COMMON, "part_ptr": "*fp32", "ref_part_ptr": "*fp32"},
    flags=lambda dtype: dict(
        HAS_SCALE=False, HAS_SOFTCAP=False, NEED_ENTROPY=True, NEED_SUM=False, HAS_REF=False
    ),
    configs=_ROWS_CONFIGS,
    defaults=_ROWS_CONFIGS,
    parse_config=_rows_parse,
    has_dot=False,
)

ROWS_GRAD = CompileSpec(
    name="rows_grad",
    module="fused_dft.kernels.rows",
    function="_rows_grad_kernel",
    arg_types={**_ROWS_COMMON, "lse_ptr": "*fp32", "coef_ptr": "*fp32", "ref_lse_ptr": "*fp32"},
    flags=lambda dtype: dict(
        HAS_SCALE=False, HAS_SOFTCAP=False, HAS_UNIFORM=False, HAS_ENTROPY_GRAD=False, HAS_REF=False
    ),
    configs=_ROWS_CONFIGS,
    defaults=_ROWS_CONFIGS,
    parse_config=_rows_parse,
    has_dot=False,
)

SPECS: dict[str, CompileSpec] = {
    s.name: s for s in (FUSED_FWD, FUSED_BWD, FUSED_FWD_REF, FUSED_BWD_REF, ROWS, ROWS_GRAD)
}
