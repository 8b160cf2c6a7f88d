"""fp32 matmuls with few rows on the CPU: ``F.linear`` (what stock nn.Linear runs) against ``ops.linear``.

Decode steps multiply 1-8 activation rows by every weight, so the speed is how fast the weights stream from
memory. Per SmolLM2 projection shape and row count, both are timed over 30 distinct weights (more bytes
than the last-level cache holds, as in a model) and reported as weight GB/s, median of 5 passes.

    python benchmarks/bench_linear.py            # rows 1, 2, 4, 8, 16
    python benchmarks/bench_linear.py --quick    # rows 1 and 4, two shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (sibling module; this folder is not an installed package)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from optimum_atb import ops  # noqa: E402

# SmolLM2-135M projections after to_atb(): (out, in)
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
SUITE = {"quick": (("gate_up", "down"), (1, 4)), "full": (tuple(SHAPES), (1, 2, 4, 8, 16))}
COPIES = 30  # one weight per decoder layer


def stream_rate(fn, x: torch.Tensor, weights: list[torch.Tensor], passes: int = 5) -> float:
    """Weight GB/s of ``fn(x, w)`` over every weight, median of `passes` after a warm-up pass."""
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    times = []
    for i in range(passes + 1):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        if i:
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def measure(shapes: tuple[str, ...], rows: tuple[int, ...]) -> list[harness.Row]:
    result = []
    with torch.inference_mode():
        for name in shapes:
            out_f, in_f = SHAPES[name]
            weights = [torch.randn(out_f, in_f) for _ in range(COPIES)]
            for m in rows:
                x = torch.randn(m, in_f)
                base = stream_rate(lambda a, w: F.linear(a, w), x, weights)
                value = stream_rate(lambda a, w: ops.linear(a, w), x, weights)
                print(
                    f"{name} [{out_f}x{in_f}] rows {m}: F.linear {base:.1f} GB/s, ops.linear {value:.1f} GB/s"
                )
                result.append(
                    harness.Row(
                        "fp32 linear, weight streaming",
                        f"ops.linear {name} {out_f}x{in_f}, {m} rows",
                        "F.linear",
                        base,
                        value,
                        unit="GB/s",
                    )  # fmt: skip
                )
    return result


def run(suite: str = "full", device: str = "cpu") -> list[harness.Row]:
    """Entry point of ``benchmarks/run_all.py`` (CPU only: elsewhere ops.linear is F.linear)."""
    if device != "cpu":
        raise SystemExit("bench_linear measures the CPU path only (ops.linear is F.linear elsewhere)")
    return measure(*SUITE[suite])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    harness.setup()
    print(harness.machine_description())
    rows = run("quick" if args.quick else "full")
    harness.print_rows(rows)
    harness.save_rows(rows, args.json)


if __name__ == "__main__":
    main()
