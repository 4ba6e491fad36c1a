"""The command line: `fused-dft bench|check|kernels|families` (also `python -m fused_dft ...`);
`fused-dft --version` prints the package's version (fused_dft.__version__).

bench    measures every provider (the naive loss, each fused_dft impl that runs on the device, and
         Liger-Kernel / torch / Cut Cross-Entropy when they can run) for time, peak memory and
         error, and writes a table, JSON, Markdown and a PNG plot to --output. With --e2e: full
         training steps of a config-built Llama, stock vs patched (tokens/s, peak memory).
check    runs every impl on a small problem against the float64 reference and prints PASS/FAIL.
kernels  compiles every Triton kernel for a GPU arch (sm_80 ... sm_120) here (no GPU needed) and
         prints its shared memory, registers, spills, tensor-core use and atomics.
families patches a tiny model of every causal-LM family of the installed transformers and
         compares it with the stock model: one line per family (ok, refused, failed, not built).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from fused_dft import __version__
from fused_dft.family import loss_types

DEFAULT_SHAPE = {"tokens": 1024, "hidden": 1024, "vocab": 32000}
SMOKE_SHAPE = {"tokens": 64, "hidden": 32, "vocab": 500}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-dft", description="fused_dft: benchmark and self-check of the fused DFT loss."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench,check,kernels,families}")
    add_bench_parser(sub)
    add_families_parser(sub)
    add_check_parser(sub)
    add_kernels_parser(sub)
    return parser


def add_bench_parser(sub) -> None:
    from .bench.problem import PRESETS
    from .bench.providers import PROVIDERS

    bench = sub.add_parser(
        "bench",
        help="time and peak memory of fused_dft against the naive loss and other libraries",
        description="Forward+backward time, peak memory above the inputs and error against the "
        "float64 reference for each provider, each in its own process. Writes bench.json, "
        "bench.md and bench.png to --output.",
    )
    bench.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    bench.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, float64")
    bench.add_argument(
        "--loss-type",
        default="dft",
        choices=[*loss_types(), "logprobs"],
        help="any member of the family, at its default parameters unless --param says (psft: "
        "fixed old_logprobs; asft: the reference is the starting model); or logprobs: "
        "fused_linear_logprobs (auto, chunked, fused, reference) against the naive log_softmax "
        "+ gather + entropy (naive), on a policy-gradient objective with an entropy bonus",
    )
    bench.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the loss_type (repeatable), e.g. --param eaft_topk=20",
    )
    bench.add_argument("--preset", help=f"D and V of a real model: {', '.join(PRESETS)}")
    size = "; comma-separated values sweep it (one size at a time)"
    bench.add_argument("--tokens", help=f"N, tokens (default {DEFAULT_SHAPE['tokens']}){size}")
    bench.add_argument("--hidden", help=f"D, hidden size (default {DEFAULT_SHAPE['hidden']}){size}")
    bench.add_argument("--vocab", help=f"V, vocabulary (default {DEFAULT_SHAPE['vocab']}){size}")
    bench.add_argument(
        "--ignore-frac",
        type=float,
        default=0.3,
        help="fraction of labels set to ignore_index, like masked prompts (default 0.3)",
    )
    bench.add_argument("--repeats", type=int, help="timed runs; the median is shown (default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    bench.add_argument(
        "--check-tokens",
        type=int,
        help="tokens for the error check against float64 (default 256; 0 = all)",
    )
    bench.add_argument(
        "--providers",
        help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default all; with --nproc: "
        "auto,vocab_parallel)",
    )
    bench.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes of the vocab_parallel provider: the vocabulary split over that many "
        "ranks (gloo on the CPU, one GPU each with NCCL), against one process (auto) on the same "
        "problem; time is the slowest rank's, memory the largest rank's peak (default 1: off)",
    )
    bench.add_argument("--output", default="bench_results", help="folder for the results")
    bench.add_argument("--timeout", type=float, help="seconds allowed per provider and shape")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny problem, one repeat ({SMOKE_SHAPE}): checks the set-up in seconds",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument(
        "--expected",
        action="store_true",
        help="print the expected GPU time of naive, chunked, fused and the 3-GEMM bound from "
        "FLOPs and bytes (bf16/fp16 inputs) and run nothing; without sizes, the issue-17 shapes",
    )
    bench.add_argument("--gpu", help="with --expected: comma-separated subset of the GPU table")

    bench.add_argument(
        "--e2e",
        action="store_true",
        help="full training steps (forward, backward, AdamW) of a config-built causal LM, stock "
        "vs patched: tokens/s and peak memory (--e2e-* options; --vocab sweeps the vocabulary)",
    )
    bench.add_argument("--e2e-seq", type=int, default=2048, help="e2e: tokens per sequence")
    bench.add_argument("--e2e-batch", type=int, default=1, help="e2e: sequences per step")
    bench.add_argument("--e2e-layers", type=int, default=2, help="e2e: decoder layers")
    bench.add_argument(
        "--e2e-compile",
        action="store_true",
        help="e2e: also the patched model under torch.compile(fullgraph=True)",
    )


def add_families_parser(sub) -> None:
    families = sub.add_parser(
        "families",
        help="patch_model on a tiny model of every causal-LM family of the installed transformers",
        description="Builds a tiny config of each entry of transformers' "
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, patches it and compares loss, every gradient, eval "
        "logits, generate and unpatch with the stock model. Prints one line per family (ok / "
        "refused with the reason / failed with numbers / not built) and exits 1 on any failure.",
    )
    families.add_argument("model_types", nargs="*", help="only these model types (default all)")
    families.add_argument("--markdown", help="also write the table as Markdown to this file")


def add_check_parser(sub) -> None:
    from .bench.check import CHECK_SHAPE

    check = sub.add_parser(
        "check",
        help="every impl on a small problem against the float64 reference: PASS or FAIL",
        description="Run after installing on a new machine. Exit status 1 when an impl fails. "
        "On a CPU, set TRITON_INTERPRET=1 to check the Triton kernels too (slow).",
    )
    check.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    check.add_argument(
        "--dtype", help="comma-separated dtypes (default float32 on cpu, float32,bfloat16 on cuda)"
    )
    for name, value in CHECK_SHAPE.items():
        check.add_argument(f"--{name}", type=int, default=value, help=f"default {value}")


def add_kernels_parser(sub) -> None:
    from .kernel_report import ARCHS, DEFAULT_ARCHS
    from .kernel_specs import DEFAULT_DTYPES, DTYPES, SPECS

    kernels = sub.add_parser(
        "kernels",
        help="GPU resources of every Triton kernel (shared memory, registers, spills, tensor "
        "cores, atomics), compiled here for sm_90 / sm_80 without a GPU",
        description="Compiles each kernel at each shipped config with the ptxas inside the "
        "triton wheel (no GPU needed) and prints one row per kernel, dtype, arch and config.",
    )
    kernels.add_argument("--kernel", help=f"comma-separated subset of: {', '.join(SPECS)}")
    kernels.add_argument(
        "--dtype",
        help=f"comma-separated subset of: {', '.join(DTYPES)} (default "
        f"{','.join(DEFAULT_DTYPES)}; fp32 = IEEE dots, torch's default; tf32 = TF32 allowed)",
    )
    kernels.add_argument(
        "--arch",
        help=f"comma-separated subset of: {', '.join(ARCHS)} (default {','.join(DEFAULT_ARCHS)})",
    )
    kernels.add_argument(
        "--config",
        default="all",
        help="'all' shipped configs (default), 'default' (those used without autotuning), or "
        "config text such as 'block_n=128,num_stages=3' (unnamed fields keep the defaults)",
    )
    kernels.add_argument("--json", help="also write the rows as a JSON list to this path")
    kernels.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_main(args, parser, argv)
    if args.command == "check":
        return check_main(args, parser)
    if args.command == "kernels":
        return kernels_main(args, parser)
    if args.command == "families":
        return families_main(args, parser)
    parser.print_help()
    return 2


# -- argument checks: each error names the option -----------------------------------------------


def resolve_device(text: str | None, parser: argparse.ArgumentParser) -> str:
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        parser.error(f"--device {text!r}: {exc}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            parser.error(
                f"--device {text}: CUDA is not available (torch {torch.__version__}, {build}, "
                f"{torch.cuda.device_count()} GPUs visible); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        parser.error(f"--device {text}: the bench and check support cpu and cuda only")
    return str(device)


def resolve_dtype(text: str, device: str, parser: argparse.ArgumentParser) -> str:
    from .bench.problem import DTYPES, canonical_dtype

    if text not in DTYPES:
        parser.error(f"--dtype {text!r}: choose from float32, bfloat16, float16, float64")
    dtype = canonical_dtype(text)
    if dtype == "float16" and device == "cpu":
        print(
            "note: --dtype float16 on the CPU: torch's fp16 matmuls are slow there", file=sys.stderr
        )
    return dtype


def parse_sizes(option: str, text: str | None, default: int, parser) -> list[int]:
    if text is None:
        return [default]
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{option} {text!r}: expected a positive integer or a comma-separated list")
    if not values or any(v < 1 for v in values):
        parser.error(f"{option} {text!r}: sizes must be positive integers")
    return values


# -- bench ---------------------------------------------------------------------------------------


def bench_main(args, parser, argv: list[str]) -> int:
    if args.expected:
        return expected_main(args, parser)
    if args.e2e:
        return e2e_main(args, parser, argv)
    from .bench import plot, report
    from .bench.runner import describe_problems, run_bench

    config = bench_config(args, parser)
    device = config.problems[0].device
    info = report.machine_info(device)
    description = describe_problems(config) + (f", preset {args.preset}" if args.preset else "")
    print(f"fused-dft bench: {description}")
    print(f"machine: {report.machine_line(info)}")
    _print_cpu_notes(device, info)
    sys.stdout.flush()

    records = run_bench(config, progress=not args.no_progress)

    check_tokens = config.check_tokens
    check_text = "all tokens" if check_tokens == 0 else f"the first min(N, {check_tokens}) tokens"
    meta = {
        "command": "fused-dft " + shlex.join(argv),
        "description": description,
        "machine": info,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "check_tokens": check_text,
        "sweep": config.sweep,
        "preset": args.preset,
    }
    paths = _output_paths(args.output, "bench")
    paths["json"].write_text(report.to_json(records, meta))
    paths["markdown"].write_text(report.markdown(records, meta, config.sweep))
    title = f"fused-dft bench: {description}"
    plot.plot(records, paths["plot"], _wrap(title), report.machine_line(info), config.sweep)
    _print_summary(report.terminal_table(records, config.sweep), paths)
    bad = [
        r
        for r in records
        if (r["status"] == "ok" and not r["error_ok"])
        or (
            r["status"] == "failed"
            and r["provider"] in ("naive", "auto", "chunked", "fused", "vocab_parallel")
        )
    ]
    for r in bad:
        print(
            f"problem: {r['label']}: {r.get('reason') or 'error above tolerance'}", file=sys.stderr
        )
    return 1 if bad else 0


# the shapes of issue 17's targets: Llama 3 8B's head at 16k tokens, Qwen 2.5's at 8k (TRL's)
EXPECTED_SHAPES = ((16384, 4096, 128256), (8192, 4096, 151936))


def expected_main(args, parser) -> int:
    """`fused-dft bench --expected`: the expected-time table (tools/bench/expected.py); runs
    nothing on any device."""
    from .bench import expected as model
    from .bench.problem import PRESETS

    try:
        gpus = model.parse_gpus(args.gpu)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.ignore_frac < 1:
        parser.error(f"--ignore-frac {args.ignore_frac}: must be in [0, 1)")
    given = args.preset or args.tokens or args.hidden or args.vocab
    shapes = list(EXPECTED_SHAPES)
    if given:
        shape = dict(DEFAULT_SHAPE)
        if args.preset is not None:
            if args.preset not in PRESETS:
                parser.error(f"--preset {args.preset!r}: unknown; choose from {', '.join(PRESETS)}")
            shape["hidden"], shape["vocab"] = PRESETS[args.preset]
        sizes = [parse_sizes(f"--{k}", getattr(args, k), shape[k], parser) for k in shape]
        shapes = [(n, d, v) for n in sizes[0] for d in sizes[1] for v in sizes[2]]
    print("fused-dft bench --expected: EXPECTED times (nothing ran), bf16/fp16 inputs, "
          f"{args.ignore_frac:.0%} of labels ignored; phases summed, each max(FLOPs / (peak x "
          f"{model.GEMM_EFFICIENCY} GEMM, x {model.FUSED_EFFICIENCY} fused kernels), bytes / "
          f"(bandwidth x {model.BANDWIDTH_EFFICIENCY}))")  # fmt: skip
    for n, d, v in shapes:
        print(f"\nN={n} D={d} V={v}")
        print(model.table(model.Shape(n, d, v, args.ignore_frac), gpus))
    print("\npeaks (dense 16-bit tensor cores, memory):\n" + model.sources(gpus))
    return 0


def bench_config(args, parser):
    """The problems and settings of `fused-dft bench`: each bad option is named (parser.error)."""
    from fused_dft.arguments import make_options

    from .bench.problem import PRESETS, Problem, parse_family_params
    from .bench.providers import parse_providers
    from .bench.runner import BenchConfig, with_sizes

    device = resolve_device(args.device, parser)
    dtype = resolve_dtype(args.dtype, device, parser)
    shape = dict(SMOKE_SHAPE if args.smoke else DEFAULT_SHAPE)
    if args.preset is not None:
        if args.preset not in PRESETS:
            parser.error(f"--preset {args.preset!r}: unknown; choose from {', '.join(PRESETS)}")
        shape["hidden"], shape["vocab"] = PRESETS[args.preset]
    sizes = {
        name: parse_sizes(f"--{name}", getattr(args, name), shape[name], parser)
        for name in ("tokens", "hidden", "vocab")
    }
    swept = [name for name, values in sizes.items() if len(values) > 1]
    if len(swept) > 1:
        parser.error(f"--{' and --'.join(swept)}: sweep one size at a time")
    if not 0 <= args.ignore_frac < 1:
        parser.error(f"--ignore-frac {args.ignore_frac}: must be in [0, 1)")
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    check_tokens = args.check_tokens
    if check_tokens is None:
        check_tokens = 0 if args.smoke else 256
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: must be a positive integer")
    default_providers = "auto,vocab_parallel" if args.nproc > 1 else "all"
    try:
        providers = parse_providers(args.providers or default_providers)
    except ValueError as exc:
        parser.error(f"--providers: {exc}")

    family_params = ",".join(args.param)
    try:
        if args.loss_type == "logprobs" and family_params:
            raise ValueError("--loss-type logprobs takes no parameters")
        if args.loss_type != "logprobs":
            make_options(loss_type=args.loss_type, **parse_family_params(family_params))
    except (TypeError, ValueError) as exc:
        parser.error(f"--param: {exc}")
    base = Problem(
        **DEFAULT_SHAPE,
        dtype=dtype,
        device=device,
        loss_type=args.loss_type,
        family_params=family_params,
        ignore_frac=args.ignore_frac,
        seed=args.seed,
        nproc=args.nproc,
    )
    return BenchConfig(
        problems=with_sizes(base, sizes["tokens"], sizes["hidden"], sizes["vocab"]),
        providers=providers,
        repeats=repeats,
        warmup=args.warmup,
        check_tokens=check_tokens,
        timeout_s=args.timeout,
        sweep=swept[0] if swept else None,
    )


def _print_cpu_notes(device: str, info: dict) -> None:
    """Why CPU times may not be representative: the Triton interpreter, a busy machine."""
    if device == "cpu" and info["TRITON_INTERPRET"] == "1":
        print(
            "note: TRITON_INTERPRET=1: Triton paths run in the interpreter; their times are "
            "not representative"
        )
    load = info.get("load_average_1min", 0.0)
    if device == "cpu" and load > 0.5:
        print(
            f"note: load average {load} before starting: other processes are using the CPU, "
            "so times may be inflated"
        )


def _output_paths(output: str, stem: str) -> dict[str, Path]:
    """The JSON, Markdown and PNG files of a run, in the --output folder (created)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": out / f"{stem}.json",
        "markdown": out / f"{stem}.md",
        "plot": out / f"{stem}.png",
    }


def _print_summary(table: str, paths: dict[str, Path]) -> None:
    print()
    print(table)
    print()
    for kind, path in paths.items():
        print(f"{kind:<9} {path}")


E2E_VOCABS = "128256,262144"


def e2e_main(args, parser, argv: list[str]) -> int:
    """`fused-dft bench --e2e`: training steps of a config-built Llama, stock vs patched."""
    try:
        import transformers
    except ImportError:
        parser.error("--e2e: transformers is not installed (pip install 'fused-dft[hf]')")
    from .bench import e2e, plot, report

    device = resolve_device(args.device, parser)
    dtype = resolve_dtype(args.dtype, device, parser)
    smoke = args.smoke
    vocabs = parse_sizes("--vocab", args.vocab or ("500" if smoke else E2E_VOCABS), 0, parser)
    hidden = parse_sizes("--hidden", args.hidden, 32 if smoke else 1024, parser)
    if len(hidden) > 1:
        parser.error("--e2e: --hidden takes one size (the vocabulary is what is swept)")
    for name in ("e2e_seq", "e2e_batch", "e2e_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    repeats = args.repeats if args.repeats is not None else (1 if smoke else 3)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    problems = [
        e2e.E2EProblem(vocab=v, hidden=hidden[0], layers=args.e2e_layers,
                       seq=16 if smoke else args.e2e_seq, batch=args.e2e_batch, dtype=dtype,
                       device=device, seed=args.seed)
        for v in vocabs
    ]  # fmt: skip
    p = problems[0]
    description = (
        f"Llama, hidden {p.hidden}, {p.layers} layers, tied embeddings, vocab "
        f"{','.join(map(str, vocabs))}, {p.batch} x {p.seq} tokens, {dtype} on {device}, AdamW; "
        f"median of {repeats} steps (+{args.warmup} warm-up); transformers "
        f"{transformers.__version__}"
    )
    info = report.machine_info(device)
    print(f"fused-dft bench --e2e: {description}")
    print(f"machine: {report.machine_line(info)}", flush=True)
    records = e2e.run(
        problems, repeats, args.warmup, args.timeout,
        progress=lambda r: print(f"  vocab {r['problem']['vocab']} {r['provider']}: "
                                 + e2e.progress_line(r), flush=True),
        compiled=args.e2e_compile,
    )  # fmt: skip
    meta = {"command": "fused-dft " + shlex.join(argv), "description": description,
            "machine": info, "repeats": repeats, "warmup": args.warmup}  # fmt: skip
    paths = _output_paths(args.output, "e2e")
    paths["json"].write_text(report.to_json(records, meta))
    paths["markdown"].write_text(e2e.markdown(records, meta))
    sweep = "vocab" if len(vocabs) > 1 else None
    title = _wrap(f"fused-dft bench --e2e: {description}")
    plot.plot(records, paths["plot"], title, report.machine_line(info), sweep)
    _print_summary(e2e.terminal_table(records), paths)
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        print(f"problem: {r['label']} at vocab {r['problem']['vocab']}: {r.get('reason')}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# -- check ---------------------------------------------------------------------------------------


def check_main(args, parser) -> int:
    import torch

    from .bench import report
    from .bench.check import run_check

    device = resolve_device(args.device, parser)
    shape = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab}
    for name, value in shape.items():
        if value < 1:
            parser.error(f"--{name} {value}: must be a positive integer")
    default = "float32,bfloat16" if device.startswith("cuda") else "float32"
    dtypes = [resolve_dtype(d.strip(), device, parser) for d in (args.dtype or default).split(",")]
    info = report.machine_info(device)
    print(
        f"fused-dft check: device {device}, N={args.tokens} D={args.hidden} V={args.vocab}, "
        "~30% of labels ignored"
    )
    print(
        f"machine: {report.machine_line(info)}; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )
    sys.stdout.flush()
    torch.manual_seed(0)
    results = run_check(device, dtypes, shape)
    for r in results:
        print(r.line())
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


# -- kernels -------------------------------------------------------------------------------------


def kernels_main(args, parser) -> int:
    from . import kernel_report as report

    try:
        kernels = report.parse_kernels(args.kernel)
        dtypes = report.parse_dtypes(args.dtype)
        archs = report.parse_archs(args.arch)
        jobs = report.plan_jobs(kernels, dtypes, archs, args.config)
    except ValueError as exc:
        parser.error(str(exc))
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be a positive integer")
    reason = report.missing_tools()
    if reason is not None:
        print(f"fused-dft kernels: cannot compile here: {reason}", file=sys.stderr)
        return 2

    import triton

    print(
        f"fused-dft kernels: {len(jobs)} compiles ({', '.join(kernels)} x {', '.join(dtypes)} x "
        f"{', '.join(archs)}), triton {triton.__version__}, {args.jobs} processes"
    )
    sys.stdout.flush()

    def progress(done: int, total: int, row: dict) -> None:
        what = f"{row['kernel']} {row['dtype']} {row['arch']} {row['config']}"
        print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    rows = report.compile_jobs(jobs, args.jobs, progress)
    print(report.table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.json_rows(rows), indent=1) + "\n")
        print(f"json      {args.json}")
    failed = [r for r in rows if "error" in r]
    return 1 if failed else 0


# -- families ------------------------------------------------------------------------------------


def families_main(args, parser) -> int:
    try:
        import transformers
    except ImportError:
        parser.error("families: transformers is not installed (pip install 'fused-dft[hf]')")
    import torch

    from . import hf_families
    from .bench import report

    known = hf_families.model_types()
    unknown = [t for t in args.model_types if t not in known]
    if unknown:
        parser.error(
            f"families: unknown model types {unknown}; transformers {transformers.__version__} "
            f"has {len(known)}, e.g. {', '.join(known[:5])}"
        )
    info = report.machine_info("cpu")
    header = (
        f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{info['date'][:10]}: tiny fp32 models on the CPU"
    )
    print(f"fused-dft families: {header}", flush=True)
    results = hf_families.sweep(args.model_types or None, progress=lambda r: print(r.line()))
    counts = hf_families.counts(results)
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    if args.markdown:
        title = f"# patch_model on every causal-LM family\n\n`fused-dft families`: {header}."
        Path(args.markdown).write_text(hf_families.markdown(results, title))
        print(f"markdown  {args.markdown}")
    return 1 if counts["failed"] else 0
