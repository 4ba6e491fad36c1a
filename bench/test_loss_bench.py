"""Forward + backward time of every provider of `fused-dft bench`, under pytest-benchmark.

    pytest bench --benchmark-only                       # 1024x1024x32000, fp32, dft
    pytest bench --benchmark-only --bench-shape llama3-8b:2048 --bench-rounds 2

Time only: peak memory needs one process per provider, which `fused-dft bench` does (on CUDA
the allocator's peak is added to extra_info here too). Providers that cannot run on the device
are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from fused_dft.tools.bench.problem import make_inputs
from fused_dft.tools.bench.providers import PROVIDERS


@pytest.mark.parametrize("key", list(PROVIDERS))
def test_forward_backward(benchmark, key, bench_problem, bench_rounds):
    provider = PROVIDERS[key]
    reason = provider.unavailable(bench_problem)
    if reason is not None:
        pytest.skip(reason)
    loss_fn = provider.build(bench_problem)
    hidden, weight, labels = make_inputs(bench_problem)
    device = torch.device(bench_problem.device)
    cuda = device.type == "cuda"

    def step():
        hidden.grad = None
        weight.grad = None
        loss_fn(hidden, weight, labels).backward()
        if cuda:
            torch.cuda.synchronize(device)

    p = bench_problem
    benchmark.group = f"{p.device} {p.dtype} {p.loss_type} {p.tokens}x{p.hidden}x{p.vocab}"
    benchmark.extra_info.update(provider=provider.label, **p.as_dict())
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    benchmark.pedantic(step, rounds=bench_rounds, warmup_rounds=1, iterations=1)
    if cuda:
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
