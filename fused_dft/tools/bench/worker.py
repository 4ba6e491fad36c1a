"""Measure one provider in this (fresh) process: `python -m fused_dft.tools.bench.worker '<json>'`.

The JSON argument holds {"provider", "problem" (Problem fields), "repeats", "warmup",
"check_tokens"}, or {"e2e": true, "provider", "problem" (E2EProblem fields), "repeats", "warmup"}.
The result is printed as one line `launch.RESULT_PREFIX<json>` on stdout; any other output
(warnings, library chatter) is ignored by the caller (launch.worker_result).
"""

from __future__ import annotations

import json
import sys
import traceback

from .launch import RESULT_PREFIX


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        if args.get("e2e"):  # a training step of a whole model (e2e.py)
            from .e2e import measure_e2e

            result = measure_e2e(args["provider"], args["problem"], args["repeats"], args["warmup"])
            print(RESULT_PREFIX + json.dumps(result), flush=True)
            return 0
        from .measure import measure
        from .problem import Problem

        result = measure(
            args["provider"],
            Problem(**args["problem"]),
            repeats=args["repeats"],
            warmup=args["warmup"],
            check_tokens=args["check_tokens"],
        )
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
