"""Options of the pytest-benchmark suite: `pytest bench --benchmark-only [--bench-shape ...]`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# a checkout that is not pip-installed: make `import fused_dft` find this one
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fused_dft.tools.bench.problem import PRESETS, Problem  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fused_dft bench")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if any)")
    group.addoption("--bench-dtype", default="float32")
    group.addoption("--bench-loss-type", default="dft", choices=("dft", "ce"))
    group.addoption(
        "--bench-shape",
        default="1024x1024x32000",
        help=f"NxDxV, or a preset {sorted(PRESETS)} as name:N (e.g. llama3-8b:2048)",
    )
    group.addoption("--bench-ignore-frac", type=float, default=0.3)
    group.addoption("--bench-rounds", type=int, default=3)


def parse_shape(text: str) -> tuple[int, int, int]:
    if ":" in text:
        name, tokens = text.split(":", 1)
        hidden, vocab = PRESETS[name]
        return int(tokens), hidden, vocab
    n, d, v = (int(x) for x in text.lower().split("x"))
    return n, d, v


@pytest.fixture(scope="session")
def bench_problem(request) -> Problem:
    import torch

    opt = request.config.getoption
    device = opt("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    n, d, v = parse_shape(opt("--bench-shape"))
    return Problem(
        tokens=n,
        hidden=d,
        vocab=v,
        dtype=opt("--bench-dtype"),
        device=device,
        loss_type=opt("--bench-loss-type"),
        ignore_frac=opt("--bench-ignore-frac"),
    )


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")
