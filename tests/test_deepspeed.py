"""DeepSpeed ZeRO-2 / ZeRO-3 as HF Trainer and TRL launch it, on the CPU: 2 ranks through torchrun.

The ranks run tests/deepspeed_cases.py (DS_ACCELERATOR=cpu, gloo): every case trains a tiny Qwen2
3 steps stock and patched under the same DeepSpeed config, and each case is a test here that
fails with the failing rank's traceback.
  - patched "ce" equals the stock model in the logged losses, grad norms and the final
    (gathered) parameters: ZeRO-3 with the model built under deepspeed.zero.Init (the config
    given before the model) or before the arguments, tied and untied, with gradient
    checkpointing; ZeRO-2 tied and untied; TRL's SFTTrainer against fused_dft's drop-in;
  - "dft" trains and is finite, the fused loss gathers the head itself: after each forward the
    head weight is partitioned again and DeepSpeed never registered it as an external parameter.
Skipped when deepspeed is not installed (`pip install deepspeed`: pure Python, no ops built).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .deepspeed_cases import CASES

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs deepspeed and transformers (pip install deepspeed; runs on the CPU)",
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # about 75 s on 2 shared CPU cores


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("deepspeed")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "tests.deepspeed_cases", str(out)]  # fmt: skip
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    failures: dict[str, list[str]] = {case: [] for case in CASES}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results (exit {proc.returncode}):\n"
                        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", pytrace=False)  # fmt: skip
        results = json.loads(path.read_text())
        for case in CASES:
            if case not in results:
                failures[case].append(f"rank {rank}: not run (an earlier case failed badly)")
            elif results[case] is not None:
                failures[case].append(f"rank {rank}:\n{results[case]}")
    return failures


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_training(ranks, case):
    if ranks[case]:
        pytest.fail("\n".join(ranks[case]), pytrace=False)
