"""`optimum-atb bench`: the benchmark matrix of a source checkout (``benchmarks/run_all.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._common import UsageError

# benchmarking.md: without these glibc settings batch-8 CPU runs flip between a fast and a 2x slower mode.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def benchmarks_dir() -> Path:
    """``benchmarks/`` next to the package, as in a source checkout (editable install)."""
    import optimum_atb

    folder = Path(optimum_atb.__file__).resolve().parent.parent / "benchmarks"
    if not (folder / "run_all.py").is_file() or not (folder / "harness.py").is_file():
        raise UsageError(
            f"no benchmarks/ folder next to the package (looked in {folder}): `optimum-atb bench` needs a "
            "source checkout (git clone the repository, then pip install -e '.[bench]')"
        )
    return folder


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the device and folder, apply allocator settings (re-exec) and threads, run the matrix."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
        )
    folder = benchmarks_dir()
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.environ.update(ALLOCATOR_ENV)  # must be set before the process starts: run again with them
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "optimum_atb", *argv])
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import harness
    import run_all

    threads = harness.setup(args.threads)
    print(f"allocator settings applied; {threads} threads", file=sys.stderr)
    results = run_all.run(args.suite, args.device, args.out)
    print(run_all.to_markdown(results))
    print(run_all.summary(results, args.out), file=sys.stderr)
    return 0
