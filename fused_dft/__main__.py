"""`python -m fused_dft bench|check`: the same as the `fused-dft` console script."""

from .cli import main

raise SystemExit(main())
